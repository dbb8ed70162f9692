//! The model store under `models_dir`: hub downloads (Hugging Face cache layout under `hub/`),
//! directories imported with `hearth models pull DIR`, and directories installed by
//! `scripts/fetch-models`. Serving resolves a configured source to a local directory here, and only
//! touches the network when a hub model is missing and downloads are allowed.
//!
//! Everything stays inside the models directory: store names and recorded paths must be plain
//! relative paths, and replacing a copy never follows a symlink out (model files themselves are
//! checked by `hearth_backends::ModelsRoot` when read).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use hearth_backends::is_plain_relative;
use hf_hub::api::tokio::{ApiBuilder, Progress};
use hf_hub::{Repo, RepoType};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};

use crate::config::ModelSource;

pub struct Store {
    root: PathBuf,
}

/// What `pull` recorded, so a later start finds the snapshot without asking the hub.
#[derive(Debug, Serialize, Deserialize)]
struct PullRecord {
    repo: String,
    revision: String,
    /// Snapshot directory, relative to the hub cache.
    snapshot: PathBuf,
    files: Vec<String>,
}

/// Honours the hub's own switch for offline operation.
pub fn downloads_allowed() -> bool {
    !matches!(std::env::var("HF_HUB_OFFLINE").as_deref(), Ok("1") | Ok("true") | Ok("TRUE"))
}

impl Store {
    pub fn new(root: PathBuf) -> Self {
        Self { root }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn hub_cache(&self) -> PathBuf {
        self.root.join("hub")
    }

    fn record_path(&self, repo: &str, revision: &str) -> PathBuf {
        let slug = format!("{}@{}.json", repo.replace('/', "--"), revision.replace('/', "--"));
        self.hub_cache().join(".hearth").join(slug)
    }

    /// The local directory of a pulled hub model, if every file it recorded is still there. A
    /// record whose paths would leave the hub cache is ignored.
    pub fn pulled(&self, repo: &str, revision: &str) -> Option<PathBuf> {
        let text = std::fs::read_to_string(self.record_path(repo, revision)).ok()?;
        let record: PullRecord = serde_json::from_str(&text).ok()?;
        let plain = is_plain_relative(&record.snapshot)
            && record.files.iter().all(|f| is_plain_relative(Path::new(f)));
        if !plain {
            tracing::warn!(repo, revision, "ignoring a pull record whose paths leave the hub cache");
            return None;
        }
        let dir = self.hub_cache().join(record.snapshot);
        record.files.iter().all(|f| dir.join(f).is_file()).then_some(dir)
    }

    /// A local directory holding the model, downloading a hub model first if needed and allowed.
    pub async fn resolve(&self, source: &ModelSource, allow_download: bool) -> anyhow::Result<PathBuf> {
        match source {
            ModelSource::Local(dir) if dir.is_dir() => Ok(dir.clone()),
            ModelSource::Local(dir) => bail!(
                "model directory {} does not exist (install it with `hearth models pull` or \
                 `scripts/fetch-models`)",
                dir.display()
            ),
            ModelSource::Hub { repo, revision, files } => {
                if let Some(dir) = self.pulled(repo, revision) {
                    return Ok(dir);
                }
                if !allow_download {
                    bail!(
                        "{source} is not in {} and downloads are off (HF_HUB_OFFLINE); pull it \
                         while online with `hearth models pull hf:{repo}@{revision}`",
                        self.root.display()
                    );
                }
                self.pull_hub(repo, revision, files).await
            }
        }
    }

    /// Downloads the files of `repo@revision` matching `patterns` into the hub cache.
    pub async fn pull_hub(&self, repo: &str, revision: &str, patterns: &[String]) -> anyhow::Result<PathBuf> {
        let api = ApiBuilder::new()
            .with_cache_dir(self.hub_cache())
            .with_token(std::env::var("HF_TOKEN").ok())
            .with_progress(false)
            .build()
            .context("cannot set up the Hugging Face hub client")?;
        let hub_repo = api.repo(Repo::with_revision(repo.into(), RepoType::Model, revision.into()));
        let info = hub_repo
            .info()
            .await
            .with_context(|| format!("cannot list the files of hf:{repo}@{revision}"))?;
        let available: Vec<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
        let files = select_files(&available, patterns);
        if files.is_empty() {
            bail!("no file of hf:{repo}@{revision} matches {patterns:?}");
        }
        let mut snapshot = None;
        for file in &files {
            tracing::info!(repo, revision, file, "downloading");
            let bar = DownloadBar::new(file);
            let path = hub_repo
                .download_with_progress(file, bar)
                .await
                .with_context(|| format!("cannot download {file} from hf:{repo}@{revision}"))?;
            let depth = Path::new(file).components().count();
            snapshot = path.ancestors().nth(depth).map(Path::to_owned);
        }
        let snapshot = snapshot.context("downloaded files have no snapshot directory")?;
        let record = PullRecord {
            repo: repo.into(),
            revision: revision.into(),
            snapshot: snapshot.strip_prefix(self.hub_cache()).unwrap_or(&snapshot).to_owned(),
            files,
        };
        let record_path = self.record_path(repo, revision);
        write_atomically(&record_path, &serde_json::to_vec_pretty(&record)?)?;
        Ok(snapshot)
    }

    /// Copies a model directory into the store as `name` (hard links when on the same filesystem).
    /// `name` is one plain path component; with `replace`, an existing entry of that name is
    /// removed first (a symlink is removed itself, never what it points to).
    pub fn import_dir(&self, source: &Path, name: &str, replace: bool) -> anyhow::Result<PathBuf> {
        if !source.is_dir() {
            bail!("{} is not a directory", source.display());
        }
        let single = Path::new(name).components().count() == 1;
        if !single || !is_plain_relative(Path::new(name)) || name.starts_with('.') || name == "hub" {
            bail!("`{name}` cannot name a model in the store: use one plain name (no `/`, `..`, leading `.`, or `hub`)");
        }
        let target = self.root.join(name);
        let existing = std::fs::symlink_metadata(&target).ok();
        if existing.is_some() && !replace {
            bail!("{} already exists; pass --force to replace it", target.display());
        }
        std::fs::create_dir_all(&self.root)
            .with_context(|| format!("cannot create {}", self.root.display()))?;
        let staging = self.root.join(format!(".{name}.importing"));
        if staging.exists() {
            std::fs::remove_dir_all(&staging)?;
        }
        let files = list_files(source)?;
        let total: u64 = files.iter().map(|(_, len)| len).sum();
        let bar = byte_bar(total, name);
        for (relative, len) in &files {
            let from = source.join(relative);
            let to = staging.join(relative);
            if let Some(parent) = to.parent() {
                std::fs::create_dir_all(parent)?;
            }
            if std::fs::hard_link(&from, &to).is_err() {
                std::fs::copy(&from, &to)
                    .with_context(|| format!("cannot copy {} to {}", from.display(), to.display()))?;
            }
            bar.inc(*len);
        }
        bar.finish_and_clear();
        match existing {
            Some(meta) if meta.is_dir() => std::fs::remove_dir_all(&target)?,
            Some(_) => std::fs::remove_file(&target)?, // a file or a symlink: only the entry itself goes
            None => {}
        }
        std::fs::rename(&staging, &target)?;
        Ok(target)
    }
}

/// Files matching any pattern (`*` stays within one directory). Where safetensors weights exist,
/// PyTorch pickles are skipped: they hold the same weights and are slower and riskier to read.
pub fn select_files(available: &[String], patterns: &[String]) -> Vec<String> {
    let options = glob::MatchOptions { require_literal_separator: true, ..Default::default() };
    let compiled: Vec<glob::Pattern> = patterns.iter().filter_map(|p| glob::Pattern::new(p).ok()).collect();
    let mut chosen: Vec<String> = available
        .iter()
        .filter(|file| compiled.iter().any(|p| p.matches_with(file, options)))
        .cloned()
        .collect();
    if chosen.iter().any(|f| f.ends_with(".safetensors")) {
        chosen.retain(|f| !f.ends_with(".bin"));
    }
    chosen.sort();
    chosen
}

fn list_files(root: &Path) -> anyhow::Result<Vec<(PathBuf, u64)>> {
    let mut files = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(relative) = stack.pop() {
        let dir = root.join(&relative);
        for entry in std::fs::read_dir(&dir).with_context(|| format!("cannot read {}", dir.display()))? {
            let entry = entry?;
            let name = entry.file_name();
            if name == ".git" {
                continue;
            }
            let metadata = std::fs::metadata(entry.path())?;
            if metadata.is_dir() {
                stack.push(relative.join(&name));
            } else {
                files.push((relative.join(&name), metadata.len()));
            }
        }
    }
    files.sort();
    Ok(files)
}

fn write_atomically(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let parent = path.parent().context("path has no parent")?;
    std::fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
    let temporary = path.with_extension("tmp");
    std::fs::write(&temporary, bytes).with_context(|| format!("cannot write {}", temporary.display()))?;
    std::fs::rename(&temporary, path)?;
    Ok(())
}

fn byte_bar(total: u64, message: &str) -> ProgressBar {
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{msg:30!} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_message(message.to_string());
    bar
}

/// A terminal progress bar fed by hf-hub's download callbacks (hidden when stderr is no terminal).
#[derive(Clone)]
struct DownloadBar(ProgressBar);

impl DownloadBar {
    fn new(file: &str) -> Self {
        Self(byte_bar(0, file))
    }
}

impl Progress for DownloadBar {
    async fn init(&mut self, size: usize, _filename: &str) {
        self.0.set_length(size as u64);
    }

    async fn update(&mut self, size: usize) {
        self.0.inc(size as u64);
    }

    async fn finish(&mut self) {
        self.0.finish_and_clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn patterns_stay_in_their_directory_and_prefer_safetensors() {
        let available = names(&[
            "config.json",
            "model.safetensors",
            "pytorch_model.bin",
            "onnx/model.safetensors",
            "1_Pooling/config.json",
            "README.md",
        ]);
        let patterns = names(&["config.json", "*.safetensors", "pytorch_model.bin", "*_Pooling/config.json"]);
        assert_eq!(
            select_files(&available, &patterns),
            names(&["1_Pooling/config.json", "config.json", "model.safetensors"])
        );
        let bin_only = names(&["config.json", "pytorch_model.bin"]);
        assert_eq!(select_files(&bin_only, &patterns), bin_only);
    }

    #[test]
    fn import_copies_a_tree_and_refuses_to_overwrite() {
        let source = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(source.path().join("1_Pooling")).unwrap();
        std::fs::write(source.path().join("config.json"), "{}").unwrap();
        std::fs::write(source.path().join("1_Pooling/config.json"), "{\"a\":1}").unwrap();
        let root = tempfile::tempdir().unwrap();
        let store = Store::new(root.path().to_owned());
        let dir = store.import_dir(source.path(), "m", false).unwrap();
        assert_eq!(std::fs::read_to_string(dir.join("1_Pooling/config.json")).unwrap(), "{\"a\":1}");
        assert!(store.import_dir(source.path(), "m", false).is_err());
        assert!(store.import_dir(source.path(), "m", true).is_ok());
    }

    #[test]
    fn import_names_cannot_leave_the_store() {
        let source = tempfile::tempdir().unwrap();
        std::fs::write(source.path().join("config.json"), "{}").unwrap();
        let root = tempfile::tempdir().unwrap();
        let store = Store::new(root.path().join("models"));
        for bad in ["../escape", "/tmp/abs", "a/b", "..", ".", ".hidden", "hub", ""] {
            let err = store.import_dir(source.path(), bad, true).unwrap_err().to_string();
            assert!(err.contains("cannot name a model"), "{bad}: {err}");
        }
        assert!(!root.path().join("escape").exists());
    }

    #[test]
    fn force_replaces_a_symlink_without_touching_its_target() {
        let source = tempfile::tempdir().unwrap();
        std::fs::write(source.path().join("config.json"), "{}").unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("precious"), "keep me").unwrap();
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path()).unwrap();
        std::os::unix::fs::symlink(outside.path(), root.path().join("m")).unwrap();
        let store = Store::new(root.path().to_owned());
        assert!(store.import_dir(source.path(), "m", false).is_err(), "an existing link needs --force");
        let dir = store.import_dir(source.path(), "m", true).unwrap();
        assert!(dir.join("config.json").is_file() && !dir.is_symlink());
        assert_eq!(std::fs::read_to_string(outside.path().join("precious")).unwrap(), "keep me");
    }

    #[test]
    fn pull_records_that_leave_the_hub_cache_are_ignored() {
        let root = tempfile::tempdir().unwrap();
        let store = Store::new(root.path().to_owned());
        std::fs::create_dir_all(root.path().join("elsewhere")).unwrap();
        std::fs::write(root.path().join("elsewhere/config.json"), "{}").unwrap();
        for snapshot in ["../elsewhere", "/etc"] {
            let record = PullRecord {
                repo: "org/name".into(),
                revision: "main".into(),
                snapshot: PathBuf::from(snapshot),
                files: vec!["config.json".into()],
            };
            write_atomically(&store.record_path("org/name", "main"), &serde_json::to_vec(&record).unwrap())
                .unwrap();
            assert_eq!(store.pulled("org/name", "main"), None, "{snapshot}");
        }
    }

    #[tokio::test]
    async fn offline_resolution_of_a_missing_hub_model_says_what_to_do() {
        let root = tempfile::tempdir().unwrap();
        let store = Store::new(root.path().to_owned());
        let source = ModelSource::Hub { repo: "org/name".into(), revision: "main".into(), files: vec![] };
        let err = store.resolve(&source, false).await.unwrap_err().to_string();
        assert!(err.contains("hearth models pull hf:org/name@main"), "{err}");
    }
}
