//! The shipped task files (`data/<set>/task.toml`) reproduce the preprocessing that used to be
//! hard-coded per task, bit for bit.

use hearth_model::{Dataset, Split, TaskSpec};
use sha2::{Digest, Sha256};
use std::path::PathBuf;

fn data_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../data")
}

/// sha256 over every 7th sample's feature vector (f32 bits, little-endian) and label.
fn fingerprint(d: &Dataset) -> String {
    let mut h = Sha256::new();
    for i in (0..d.len()).step_by(7) {
        for v in d.sample(i) {
            h.update(v.to_bits().to_le_bytes());
        }
        h.update(d.y[i].to_le_bytes());
    }
    hex::encode(h.finalize())
}

/// Fingerprints of the feature vectors computed by the hard-coded preprocessing (`Task::load`
/// before task files, commit df57857), recorded when the two still ran side by side and gave
/// bit-identical vectors for every sample of both splits.
const EXPECTED: [(&str, usize, &str, &str); 3] = [
    (
        "plaid",
        387,
        "383b7a0c7cd7ca7f3f0e0ecb7ae23ad8ec080b3cf693eb32ac166aa905dc7cc0",
        "2a18a2951f40e263672f4b3369645662aad038dd165bf0145630b994c4c30222",
    ),
    (
        "faces",
        625,
        "d6378ed9b7f47b5228099aacd952a883bf8e3b1b9e768739dc137bfb4700a0b1",
        "428b84b79faf5b698131e562d8232da6bd5683af7fe3de54b6c62b4c0132e1d4",
    ),
    (
        "digits",
        64,
        "67162161e5ad25ca3910bfdaf075888f63079cb332b6137ca2c72d621f9094ea",
        "0d2790534a23b1a67e0ea3ffc38bfd7de18be0aecc3d969e40ecd3b83a9f2c88",
    ),
];

/// PLAID's task file before the MiniRocket front end (the hard-coded recipe of commit df57857).
const PLAID_FEATURES: &str = r#"
name = "plaid"
classes = [
  "air_conditioner", "compact_fluorescent_lamp", "fan", "fridge", "hairdryer", "heater",
  "incandescent_light_bulb", "laptop", "microwave", "vacuum", "washing_machine",
]
event = "appliance"
[input]
kind = "series"
channels = 1
[[preprocess]]
step = "plaid_features"
length = 256
level_scale = 166.5
ref_len = 256
[model]
family = "mlp"
hidden = [64]
[data]
format = "csv"
header = false
labels = "index"
train = "train.csv"
test = "test.csv"
"#;

#[test]
fn shipped_task_files_give_the_same_feature_vectors() {
    for (name, input_len, train_fp, test_fp) in EXPECTED {
        let spec = if name == "plaid" {
            // PLAID's task file now uses the MiniRocket front end; the former chain is
            // still a valid task file and must still give the same vectors.
            TaskSpec::from_toml_str(PLAID_FEATURES, &data_dir().join("plaid/task.toml")).unwrap()
        } else {
            TaskSpec::resolve(name, &data_dir()).unwrap()
        };
        assert_eq!(spec.input_len(), input_len);
        for (split, fp) in [(Split::Train, train_fp), (Split::Test, test_fp)] {
            let new = spec.load(split).unwrap();
            assert_eq!(new.x.len(), new.len() * input_len);
            assert_eq!(fingerprint(&new), fp, "{name} {split:?}");
        }
    }
}

#[test]
fn the_enum_is_a_view_of_the_task_files() {
    for task in hearth_model::Task::ALL {
        let file = TaskSpec::resolve(task.name(), &data_dir()).unwrap();
        let embedded = task.spec();
        assert_eq!(embedded, file);
        assert_eq!(task.classes(), file.classes);
        assert_eq!(task.default_spec(), file.mlp_spec());
        // classes.txt (read by other tools) agrees with the task file.
        let txt =
            std::fs::read_to_string(data_dir().join(task.name()).join("classes.txt")).unwrap();
        assert_eq!(txt.lines().collect::<Vec<_>>(), file.classes);
    }
}
