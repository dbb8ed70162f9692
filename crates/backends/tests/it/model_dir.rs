//! Nothing a model directory says can make Hearth read outside the models directory: not a
//! `modules.json` path, not a symlinked file, not a symlinked directory.

use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use hearth_backends::{ModelDir, ModelsRoot};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models").join(name)
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// A models root holding a copy of the tiny embedder as `m`, and a directory outside the root.
struct Setup {
    _temp: tempfile::TempDir,
    root: PathBuf,
    model: PathBuf,
    outside: PathBuf,
}

fn setup() -> Setup {
    let temp = tempfile::tempdir().unwrap();
    let root = temp.path().join("models");
    let model = root.join("m");
    copy_dir(&fixture("tiny-bert-embed"), &model);
    let outside = temp.path().join("outside");
    copy_dir(&fixture("tiny-bert-embed"), &outside);
    Setup { _temp: temp, root, model, outside }
}

fn inspect(setup: &Setup, dir: &Path) -> Result<ModelDir, String> {
    ModelDir::inspect(dir, &ModelsRoot::new(&setup.root).unwrap()).map_err(|e| e.to_string())
}

#[test]
fn a_plain_model_directory_is_read() {
    let s = setup();
    assert!(inspect(&s, &s.model).is_ok());
}

#[test]
fn modules_json_paths_cannot_climb_out() {
    let s = setup();
    for bad in ["../../outside/1_Pooling", "/etc", "./1_Pooling/.."] {
        let modules = format!(
            r#"[{{"idx": 1, "name": "1", "path": "{bad}", "type": "sentence_transformers.models.Pooling"}}]"#
        );
        std::fs::write(s.model.join("modules.json"), modules).unwrap();
        let err = inspect(&s, &s.model).unwrap_err();
        assert!(err.contains("not a plain relative path"), "{bad}: {err}");
    }
}

#[test]
fn symlinked_files_must_resolve_inside_the_root() {
    let s = setup();
    std::fs::remove_file(s.model.join("tokenizer.json")).unwrap();
    symlink(s.outside.join("tokenizer.json"), s.model.join("tokenizer.json")).unwrap();
    let err = inspect(&s, &s.model).unwrap_err();
    assert!(err.contains("outside the models directory"), "{err}");

    // The same link to a file elsewhere inside the root is fine (hub snapshots link to blobs).
    std::fs::remove_file(s.model.join("tokenizer.json")).unwrap();
    std::fs::create_dir_all(s.root.join("blobs")).unwrap();
    std::fs::copy(s.outside.join("tokenizer.json"), s.root.join("blobs/abc")).unwrap();
    symlink("../blobs/abc", s.model.join("tokenizer.json")).unwrap();
    assert!(inspect(&s, &s.model).is_ok());
}

#[test]
fn symlinked_weights_and_directories_must_resolve_inside_the_root() {
    let s = setup();
    std::fs::remove_file(s.model.join("model.safetensors")).unwrap();
    symlink(s.outside.join("model.safetensors"), s.model.join("model.safetensors")).unwrap();
    let err = inspect(&s, &s.model).unwrap_err();
    assert!(err.contains("outside the models directory"), "{err}");

    let linked = s.root.join("linked");
    symlink(&s.outside, &linked).unwrap();
    let err = inspect(&s, &linked).unwrap_err();
    assert!(err.contains("outside the models directory"), "{err}");
}
