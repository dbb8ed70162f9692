//! `hearth ingest PATH... --store NAME`: puts a folder of documents into a vector store of a
//! running Hearth, through its own OpenAI-shaped API (the server stays the one writer of its data
//! directory, and its embedder does the work under its usual admission). Files are uploaded
//! (`POST /v1/files`) and added in batches of up to [`BATCH_FILES`] (`file_batches`), so the
//! server ingests one batch while the next uploads; two progress bars follow the uploads and the
//! ingest. Each file's path relative to the folder it was found in is its `path` attribute, which
//! makes a second run skip what the store already holds (or, with `--replace`, replace it) and
//! lets searches filter by path.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use hearth_rag::extract::Format;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use serde_json::{json, Map, Value};

/// Files per `file_batches` request (the server takes up to 500).
pub const BATCH_FILES: usize = 100;
/// How often the ingest progress is polled.
const POLL: Duration = Duration::from_millis(500);
/// The attribute that holds a file's relative path.
pub const PATH_ATTRIBUTE: &str = "path";

/// What one `hearth ingest` run does.
#[derive(Clone, Debug)]
pub struct IngestOptions {
    pub paths: Vec<PathBuf>,
    /// A store name (created when no store has it) or a store id (`vs_…`).
    pub store: String,
    /// The server's base URL, e.g. `http://127.0.0.1:8080`.
    pub url: String,
    pub api_key: Option<String>,
    /// `static` chunking (`max_chunk_size_tokens`, `chunk_overlap_tokens`); `auto` when `None`.
    pub chunking: Option<(usize, usize)>,
    /// Attributes set on every file besides `path`.
    pub attributes: Map<String, Value>,
    /// Replace files the store already holds under the same path instead of skipping them.
    pub replace: bool,
    pub progress: bool,
}

/// A document found under the given paths.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Document {
    pub path: PathBuf,
    /// Its path relative to the folder it was found in (`/`-separated), or its file name.
    pub relative: String,
}

/// What a run did.
#[derive(Debug, Default)]
pub struct Summary {
    pub store_id: String,
    pub ingested: usize,
    pub skipped_present: usize,
    pub skipped_unsupported: usize,
    pub replaced: usize,
    /// (relative path, why) for each file that could not be uploaded or ingested.
    pub failed: Vec<(String, String)>,
}

/// Every document under `paths`: files as given, folders walked recursively in name order.
/// Hidden entries (`.git`, `.env`) are left out, as are files whose extension the store does
/// not read (their count is returned).
pub fn collect(paths: &[PathBuf]) -> anyhow::Result<(Vec<Document>, usize)> {
    let mut documents = Vec::new();
    let mut unsupported = 0;
    for path in paths {
        let meta = std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
        if meta.is_dir() {
            walk(path, path, &mut documents, &mut unsupported)?;
        } else {
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            if Format::from_name(&name).is_some() {
                documents.push(Document { path: path.clone(), relative: name });
            } else {
                unsupported += 1;
            }
        }
    }
    Ok((documents, unsupported))
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<Document>, unsupported: &mut usize) -> anyhow::Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("cannot list {}", dir.display()))?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        let path = entry.path();
        // Follows links, as `cat` would; a dangling one is skipped.
        let Ok(meta) = std::fs::metadata(&path) else { continue };
        if meta.is_dir() {
            walk(root, &path, out, unsupported)?;
        } else if Format::from_name(&name).is_some() {
            let relative = path.strip_prefix(root).unwrap_or(&path);
            let relative: Vec<String> =
                relative.components().map(|c| c.as_os_str().to_string_lossy().into_owned()).collect();
            out.push(Document { path, relative: relative.join("/") });
        } else {
            *unsupported += 1;
        }
    }
    Ok(())
}

/// A failed API call: the HTTP status and OpenAI's error message.
#[derive(Debug)]
struct ApiFailure {
    status: u16,
    message: String,
}

impl std::fmt::Display for ApiFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HTTP {}: {}", self.status, self.message)
    }
}

impl std::error::Error for ApiFailure {}

struct Client {
    http: reqwest::Client,
    base: String,
    api_key: Option<String>,
}

impl Client {
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<(String, Vec<u8>)>,
    ) -> anyhow::Result<Value> {
        let url = format!("{}{path}", self.base);
        let mut request = self.http.request(method.clone(), &url);
        if let Some(key) = &self.api_key {
            request = request.bearer_auth(key);
        }
        if let Some((content_type, bytes)) = body {
            request = request.header(reqwest::header::CONTENT_TYPE, content_type).body(bytes);
        }
        let response = request.send().await.map_err(|e| {
            anyhow::anyhow!("cannot reach Hearth at {}: {e} (is `hearth serve` running there?)", self.base)
        })?;
        let status = response.status();
        let bytes =
            response.bytes().await.with_context(|| format!("reading the reply to {method} {path}"))?;
        let value: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        if !status.is_success() {
            let message = value["error"]["message"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned());
            return Err(ApiFailure { status: status.as_u16(), message }.into());
        }
        Ok(value)
    }

    async fn get(&self, path: &str) -> anyhow::Result<Value> {
        self.call(reqwest::Method::GET, path, None).await
    }

    async fn post(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        let bytes = serde_json::to_vec(body).expect("a JSON value serializes");
        self.call(reqwest::Method::POST, path, Some(("application/json".into(), bytes))).await
    }

    async fn delete(&self, path: &str) -> anyhow::Result<Value> {
        self.call(reqwest::Method::DELETE, path, None).await
    }

    /// Every item of a paginated list (`limit`, `after`, `has_more`, `last_id`).
    async fn list_all(&self, path: &str) -> anyhow::Result<Vec<Value>> {
        let mut items = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let separator = if path.contains('?') { '&' } else { '?' };
            let page_path = match &after {
                Some(id) => format!("{path}{separator}limit=100&after={id}"),
                None => format!("{path}{separator}limit=100"),
            };
            let page = self.get(&page_path).await?;
            let data = page["data"].as_array().cloned().unwrap_or_default();
            items.extend(data);
            match (page["has_more"].as_bool(), page["last_id"].as_str()) {
                (Some(true), Some(last)) => after = Some(last.to_string()),
                _ => return Ok(items),
            }
        }
    }

    /// `POST /v1/files` with `purpose=assistants`; the new file's id.
    async fn upload(&self, name: &str, bytes: Vec<u8>) -> anyhow::Result<String> {
        let boundary = format!("hearth-ingest-{}", uuid_like());
        let (content_type, body) = multipart(&boundary, name, bytes);
        let file = self.call(reqwest::Method::POST, "/v1/files", Some((content_type, body))).await?;
        file["id"].as_str().map(str::to_string).context("the upload reply has no file id")
    }
}

/// A boundary no file is likely to contain.
fn uuid_like() -> String {
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    format!("{nanos:x}{:x}", std::process::id())
}

/// A `multipart/form-data` body with `purpose=assistants` and the file; the content type names
/// the boundary.
fn multipart(boundary: &str, name: &str, bytes: Vec<u8>) -> (String, Vec<u8>) {
    let name = name.replace(['"', '\\', '\r', '\n'], "_");
    let mut body = Vec::with_capacity(bytes.len() + 512);
    body.extend_from_slice(
        format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nassistants\r\n\
             --{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n\
             Content-Type: application/octet-stream\r\n\r\n"
        )
        .as_bytes(),
    );
    body.extend_from_slice(&bytes);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

/// The id of the store `name_or_id` names, created when it names none (an id must exist).
async fn find_or_create_store(client: &Client, name_or_id: &str) -> anyhow::Result<(String, bool)> {
    if name_or_id.starts_with("vs_") {
        let store = client.get(&format!("/v1/vector_stores/{name_or_id}")).await?;
        return Ok((store["id"].as_str().unwrap_or(name_or_id).to_string(), false));
    }
    let stores = client.list_all("/v1/vector_stores").await?;
    if let Some(store) = stores.iter().find(|s| s["name"].as_str() == Some(name_or_id)) {
        return Ok((store["id"].as_str().context("a store without an id")?.to_string(), false));
    }
    let store = client.post("/v1/vector_stores", &json!({ "name": name_or_id })).await?;
    Ok((store["id"].as_str().context("the new store has no id")?.to_string(), true))
}

fn bar(multi: &MultiProgress, visible: bool, total: u64, template: &str, message: &str) -> ProgressBar {
    let bar = if visible { multi.add(ProgressBar::new(total)) } else { ProgressBar::hidden() };
    bar.set_style(
        ProgressStyle::with_template(template)
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_message(message.to_string());
    bar
}

/// Runs one ingest (see the module docs).
pub async fn ingest(options: IngestOptions) -> anyhow::Result<Summary> {
    let (documents, unsupported) = collect(&options.paths)?;
    let client = Client {
        http: reqwest::Client::builder().build().context("cannot build the HTTP client")?,
        base: options.url.trim_end_matches('/').to_string(),
        api_key: options.api_key.clone(),
    };
    let (store, created) = find_or_create_store(&client, &options.store).await?;
    let mut summary =
        Summary { store_id: store.clone(), skipped_unsupported: unsupported, ..Default::default() };
    if created {
        tracing::info!(store = %store, name = %options.store, "created the vector store");
    }

    // What the store already holds, by path attribute (files in progress count: they will land).
    let mut present: HashMap<String, String> = HashMap::new();
    if !created {
        for file in client.list_all(&format!("/v1/vector_stores/{store}/files")).await? {
            let status = file["status"].as_str().unwrap_or_default();
            if let (Some(path), "completed" | "in_progress") =
                (file["attributes"][PATH_ATTRIBUTE].as_str(), status)
            {
                if let Some(id) = file["id"].as_str() {
                    present.insert(path.to_string(), id.to_string());
                }
            }
        }
    }
    let mut todo = Vec::with_capacity(documents.len());
    for document in documents {
        match present.get(&document.relative) {
            Some(old) if options.replace => todo.push((document, Some(old.clone()))),
            Some(_) => summary.skipped_present += 1,
            None => todo.push((document, None)),
        }
    }

    let multi = MultiProgress::new();
    let total_bytes: u64 =
        todo.iter().filter_map(|(d, _)| std::fs::metadata(&d.path).ok()).map(|m| m.len()).sum();
    let uploads = bar(
        &multi,
        options.progress,
        total_bytes,
        "{msg:12} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        "uploading",
    );
    let ingested = bar(
        &multi,
        options.progress,
        todo.len() as u64,
        "{msg:12} [{bar:30}] {pos}/{len} files, {elapsed} elapsed, eta {eta}",
        "ingesting",
    );

    let mut chunking = Value::Null;
    if let Some((max, overlap)) = options.chunking {
        chunking = json!({"type": "static", "static": {"max_chunk_size_tokens": max, "chunk_overlap_tokens": overlap}});
    }
    let mut names: HashMap<String, String> = HashMap::new();
    let mut batches: Vec<String> = Vec::new();
    let mut pending: Vec<Value> = Vec::new();
    let mut done_before: u64 = 0;
    let mut progress = BatchProgress::default();
    for (index, (document, old)) in todo.iter().enumerate() {
        let bytes = match std::fs::read(&document.path) {
            Ok(bytes) => bytes,
            Err(e) => {
                summary.failed.push((document.relative.clone(), format!("cannot read it: {e}")));
                ingested.inc(1);
                done_before += 1;
                continue;
            }
        };
        let size = bytes.len() as u64;
        let name =
            document.path.file_name().map_or(document.relative.clone(), |n| n.to_string_lossy().into_owned());
        match client.upload(&name, bytes).await {
            Ok(id) => {
                if let Some(old) = old {
                    // The old copy leaves once the new one is uploaded, so a failed run keeps it.
                    client.delete(&format!("/v1/vector_stores/{store}/files/{old}")).await?;
                    client.delete(&format!("/v1/files/{old}")).await.ok();
                    summary.replaced += 1;
                }
                let mut attributes = options.attributes.clone();
                attributes.insert(PATH_ATTRIBUTE.into(), Value::String(document.relative.clone()));
                names.insert(id.clone(), document.relative.clone());
                pending.push(json!({ "file_id": id, "attributes": attributes }));
            }
            // The server refused this file (too large, unreadable): note it and go on.
            Err(e) if e.downcast_ref::<ApiFailure>().is_some_and(|f| matches!(f.status, 400 | 413 | 415)) => {
                summary.failed.push((document.relative.clone(), e.to_string()));
                ingested.inc(1);
                done_before += 1;
            }
            Err(e) => return Err(e.context(format!("uploading {}", document.path.display()))),
        }
        uploads.inc(size);
        if pending.len() == BATCH_FILES {
            batches.push(add_batch(&client, &store, std::mem::take(&mut pending), &chunking).await?);
        }
        // Keep the ingest bar moving while uploading.
        if index % 10 == 9 {
            let done = done_before + progress.poll(&client, &store, &batches).await?.0;
            ingested.set_position(done);
        }
    }
    if !pending.is_empty() {
        batches.push(add_batch(&client, &store, pending, &chunking).await?);
    }
    uploads.finish_with_message("uploaded");

    loop {
        let (done, in_progress) = progress.poll(&client, &store, &batches).await?;
        ingested.set_position(done_before + done);
        if in_progress == 0 {
            break;
        }
        tokio::time::sleep(POLL).await;
    }
    ingested.finish_with_message("ingested");

    for batch in &batches {
        for file in client.list_all(&format!("/v1/vector_stores/{store}/file_batches/{batch}/files")).await? {
            let id = file["id"].as_str().unwrap_or_default();
            let name = names.get(id).cloned().unwrap_or_else(|| id.to_string());
            match file["status"].as_str() {
                Some("completed") => summary.ingested += 1,
                Some(status) => {
                    let why = file["last_error"]["message"].as_str().unwrap_or(status).to_string();
                    summary.failed.push((name, why));
                }
                None => {}
            }
        }
    }
    Ok(summary)
}

/// Adds uploaded files to the store as one `file_batches` request; the batch's id.
async fn add_batch(
    client: &Client,
    store: &str,
    files: Vec<Value>,
    chunking: &Value,
) -> anyhow::Result<String> {
    let mut body = json!({ "files": files });
    if !chunking.is_null() {
        body["chunking_strategy"] = chunking.clone();
    }
    let batch = client.post(&format!("/v1/vector_stores/{store}/file_batches"), &body).await?;
    Ok(batch["id"].as_str().context("the batch reply has no id")?.to_string())
}

/// The batches' progress; a batch with nothing left in progress is not asked again.
#[derive(Default)]
struct BatchProgress {
    finished: HashMap<String, u64>,
}

impl BatchProgress {
    /// Files of `batches` no longer in progress, and those still in progress.
    async fn poll(&mut self, client: &Client, store: &str, batches: &[String]) -> anyhow::Result<(u64, u64)> {
        let (mut done, mut in_progress) = (0, 0);
        for id in batches {
            if let Some(count) = self.finished.get(id) {
                done += count;
                continue;
            }
            let batch = client.get(&format!("/v1/vector_stores/{store}/file_batches/{id}")).await?;
            let counts = &batch["file_counts"];
            let count = |key: &str| counts[key].as_u64().unwrap_or(0);
            let finished = count("completed") + count("failed") + count("cancelled");
            done += finished;
            in_progress += count("in_progress");
            if count("in_progress") == 0 {
                self.finished.insert(id.clone(), finished);
            }
        }
        Ok((done, in_progress))
    }
}

/// Parses `KEY=VALUE` attributes: `true`/`false` and numbers as themselves, the rest as strings.
pub fn parse_attribute(text: &str) -> Result<(String, Value), String> {
    let (key, value) = text.split_once('=').ok_or_else(|| format!("`{text}` is not KEY=VALUE"))?;
    if key.is_empty() || key == PATH_ATTRIBUTE {
        return Err(format!("`{key}` cannot be set: `{PATH_ATTRIBUTE}` is each file's own path"));
    }
    let value = match value {
        "true" => Value::Bool(true),
        "false" => Value::Bool(false),
        v => v
            .parse::<f64>()
            .ok()
            .and_then(|n| serde_json::Number::from_f64(n).map(Value::Number))
            .unwrap_or_else(|| Value::String(v.into())),
    };
    Ok((key.to_string(), value))
}

/// `hearth ingest`'s exit: prints the summary; an error when any file failed.
pub fn report(summary: &Summary, store_name: &str) -> anyhow::Result<()> {
    println!(
        "{store_name} ({}): {} ingested, {} replaced, {} already there, {} not a readable type, {} failed",
        summary.store_id,
        summary.ingested,
        summary.replaced,
        summary.skipped_present,
        summary.skipped_unsupported,
        summary.failed.len()
    );
    for (path, why) in &summary.failed {
        eprintln!("  failed: {path}: {why}");
    }
    if !summary.failed.is_empty() {
        bail!("{} file(s) were not ingested", summary.failed.len());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folders_are_walked_in_order_without_hidden_or_unreadable_files() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("guide/deep")).unwrap();
        std::fs::create_dir_all(root.join(".git")).unwrap();
        for (path, text) in [
            ("b.md", "# b"),
            ("a.txt", "a"),
            ("guide/deep/c.html", "<p>c</p>"),
            ("guide/image.png", "\u{89}PNG"),
            (".git/config", "[core]"),
            (".env.md", "SECRET=1"),
        ] {
            std::fs::write(root.join(path), text).unwrap();
        }
        let single = root.join("guide/deep/c.html");
        let (documents, unsupported) = collect(&[root.to_path_buf(), single.clone()]).unwrap();
        let relative: Vec<&str> = documents.iter().map(|d| d.relative.as_str()).collect();
        assert_eq!(relative, ["a.txt", "b.md", "guide/deep/c.html", "c.html"]);
        assert_eq!(documents[3].path, single);
        assert_eq!(unsupported, 1, "the png");
        assert!(collect(&[root.join("missing")]).unwrap_err().to_string().contains("missing"));
    }

    #[test]
    fn attributes_parse_as_json_scalars() {
        assert_eq!(parse_attribute("team=docs").unwrap(), ("team".into(), json!("docs")));
        assert_eq!(parse_attribute("year=2024").unwrap(), ("year".into(), json!(2024.0)));
        assert_eq!(parse_attribute("draft=false").unwrap(), ("draft".into(), json!(false)));
        assert_eq!(parse_attribute("note=a=b").unwrap(), ("note".into(), json!("a=b")));
        assert!(parse_attribute("novalue").is_err());
        assert!(parse_attribute("path=x").unwrap_err().contains("own path"));
    }

    #[test]
    fn multipart_bodies_carry_the_purpose_and_the_file() {
        let (content_type, body) = multipart("B", "a\"b.md", b"hello".to_vec());
        assert_eq!(content_type, "multipart/form-data; boundary=B");
        let body = String::from_utf8(body).unwrap();
        assert!(
            body.starts_with("--B\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nassistants\r\n")
        );
        assert!(body.contains(
            "filename=\"a_b.md\"\r\nContent-Type: application/octet-stream\r\n\r\nhello\r\n--B--\r\n"
        ));
    }
}
