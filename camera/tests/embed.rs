//! Learning on the camera, the camera's half: the frozen BlazeFace backbone embeds crops
//! ([`hearth_camera::embed`]); the vendored `data/faces-cam` rows are exactly what it computes
//! for the faces set; a small head trained on them tells faces from background on held-out
//! crops, and classifies the crops of real detections (the reference frames through the real
//! detector) as `person`.

use std::path::PathBuf;

use hearth_camera::detector::FRAME_BYTES;
use hearth_camera::{Detector, DetectorOptions, Embedder, EMBED_DIM};
use hearth_model::{accuracy, train, Classifier, OnnxModel, Split, TaskSpec, TrainConfig};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn model_path() -> PathBuf {
    root().join("data/models/face_detection_front_128x128_barracuda.onnx")
}

fn rows(path: &std::path::Path) -> Vec<(u32, Vec<f32>)> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter(|l| !l.is_empty())
        .map(|l| {
            let mut it = l.split(',');
            let label = it.next().unwrap().parse().unwrap();
            (label, it.map(|v| v.parse().unwrap()).collect())
        })
        .collect()
}

#[test]
fn vendored_embeddings_match_the_embedder() {
    let emb = Embedder::load(&model_path()).unwrap();
    for split in ["train", "test"] {
        let crops = rows(&root().join(format!("data/faces/{split}.csv")));
        let vendored = rows(&root().join(format!("data/faces-cam/{split}.csv")));
        assert_eq!(crops.len(), vendored.len(), "{split}");
        for (i, ((l, px), (vl, ve))) in crops.iter().zip(&vendored).enumerate() {
            assert_eq!(l, vl, "{split} row {i}: label");
            assert_eq!(ve.len(), EMBED_DIM);
            let e = emb.embed_grey(px, 25).unwrap();
            let worst = e
                .iter()
                .zip(ve)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(worst < 1e-4, "{split} row {i}: off by {worst}");
        }
    }
}

#[test]
fn a_head_on_the_embedding_tells_faces_and_finds_the_detected_ones() {
    let task = TaskSpec::resolve("faces-cam", &root().join("data")).unwrap();
    let train_set = task.load(Split::Train).unwrap();
    let test = task.load(Split::Test).unwrap();
    let mut head = OnnxModel::build_mlp(&task.mlp_spec(), 3);
    let (w, _) = train(
        &head,
        &train_set,
        &TrainConfig {
            epochs: 40,
            seed: 3,
            ..TrainConfig::default()
        },
    )
    .unwrap();
    head.set_weights(&w).unwrap();
    let clf = Classifier::new(&head).unwrap();
    let acc = accuracy(&clf, &test).unwrap();
    eprintln!("faces-cam head (central, 40 epochs): held-out accuracy {acc:.3}");
    assert!(acc >= 0.9, "held-out accuracy {acc}");

    // Real detections on the reference frames (0–2 have a face): their crops are `person`.
    let frames = std::fs::read(root().join("camera/tests/fixtures/frames.rgb")).unwrap();
    let det = Detector::load(&model_path(), DetectorOptions::default()).unwrap();
    let emb = Embedder::load(&model_path()).unwrap();
    let person = test.classes.iter().position(|c| c == "person").unwrap();
    let mut seen = 0;
    for f in frames.chunks_exact(FRAME_BYTES).take(3) {
        for d in det.detect(f).unwrap() {
            let x = emb.embed_box(f, &d.bbox).unwrap();
            let p = clf.predict(&x).unwrap();
            assert!(p[person] > 0.5, "a detected face's crop: {p:?}");
            seen += 1;
        }
    }
    assert!(seen >= 3, "{seen} detections");
}
