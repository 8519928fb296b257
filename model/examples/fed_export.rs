//! Exports what a peer framework needs to run the same federated task as Hearth's agents:
//! `cargo run -p hearth-model --example fed_export -- <task> <clients> <alpha> <seed> <model_seed> <out>`
//! writes `<out>/part-<i>.csv` (the preprocessed share agent `i` of `clients` trains on, with
//! `[partition] alpha/seed` — `Dataset::partition`, the agents' own call), `<out>/test.csv`
//! (the coordinator's held-out split), each row `label,x1,…`, and the initial model as
//! `<out>/init.onnx` (the coordinator's `init`) and `<out>/init.json` (its weights by name,
//! shape and values, for numpy). Used by `bench/federation`; not part of the product.

use hearth_model::{Dataset, Split, TaskSpec};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

fn write_csv(d: &Dataset, path: &Path) -> std::io::Result<()> {
    let mut s = String::new();
    for i in 0..d.len() {
        let _ = write!(s, "{}", d.y[i]);
        for v in d.sample(i) {
            let _ = write!(s, ",{v}");
        }
        s.push('\n');
    }
    std::fs::write(path, s)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a: Vec<String> = std::env::args().skip(1).collect();
    if a.len() != 6 {
        return Err("usage: fed_export <task> <clients> <alpha> <seed> <model_seed> <out>".into());
    }
    let spec = TaskSpec::resolve(&a[0], Path::new("data"))?;
    let (clients, alpha, seed, model_seed): (usize, f32, u64, u64) =
        (a[1].parse()?, a[2].parse()?, a[3].parse()?, a[4].parse()?);
    let out = PathBuf::from(&a[5]);
    std::fs::create_dir_all(&out)?;
    let train = spec.load(Split::Train)?;
    for i in 0..clients {
        let part = train.partition(i, clients, alpha, seed);
        write_csv(&part, &out.join(format!("part-{i}.csv")))?;
    }
    write_csv(&spec.load(Split::Test)?, &out.join("test.csv"))?;
    let model = spec.build_model(model_seed)?;
    model.save(&out.join("init.onnx"))?;
    let mut json = String::from("{");
    for (k, (name, t)) in model.weights().iter().enumerate() {
        let vals: Vec<String> = t.data.iter().map(|v| format!("{v:e}")).collect();
        let _ = write!(
            json,
            "{}\"{name}\":{{\"shape\":{:?},\"data\":[{}]}}",
            if k > 0 { "," } else { "" },
            t.shape,
            vals.join(",")
        );
    }
    json.push('}');
    std::fs::write(out.join("init.json"), json)?;
    println!(
        "wrote {clients} partitions, test.csv and init.* to {}",
        out.display()
    );
    Ok(())
}
