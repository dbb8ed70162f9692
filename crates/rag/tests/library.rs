//! The library end to end on a tiny stand-in embedder (hashed bag of words: a real, if weak,
//! vector space in which shared words mean close vectors): persistence across reopen, deletion,
//! filters, hybrid ranking, and a crash (SIGKILL) in the middle of ingest.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hearth_rag::filter::Filter;
use hearth_rag::{
    ChunkingStrategy, Library, LibraryOptions, Metric, NewChunk, PageRequest, SearchRequest, StoreFileStatus,
};
use serde_json::{json, Map, Value};

const DIMS: usize = 64;
const CHUNKING: ChunkingStrategy = ChunkingStrategy { max_chunk_size_tokens: 800, chunk_overlap_tokens: 400 };

/// The stand-in embedder: each lower-cased word adds 1 to a hashed dimension; unit length.
fn embed(text: &str) -> Vec<f32> {
    let mut v = vec![0f32; DIMS];
    for word in text.split(|c: char| !c.is_alphanumeric()).filter(|w| !w.is_empty()) {
        let hash = word
            .to_lowercase()
            .bytes()
            .fold(0xcbf29ce484222325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100000001b3));
        v[(hash % DIMS as u64) as usize] += 1.0;
    }
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-6);
    v.iter().map(|x| x / norm).collect()
}

fn chunks(texts: &[&str]) -> Vec<NewChunk> {
    texts
        .iter()
        .enumerate()
        .map(|(i, t)| NewChunk { position: i, text: t.to_string(), vector: embed(t) })
        .collect()
}

fn request(query: &str) -> SearchRequest {
    SearchRequest {
        vector: Some(embed(query)),
        text: Some(query.to_string()),
        candidates: 10,
        filter: None,
        dense_weight: 1.0,
        lexical_weight: 1.0,
        fusion: hearth_rag::fusion::Fusion::RelativeScore,
    }
}

fn ingest(library: &Library, store: &str, name: &str, texts: &[&str], attributes: Value) -> String {
    let file = library.create_file(name, "assistants", texts.join("\n").as_bytes()).unwrap();
    let attributes: Map<String, Value> = attributes.as_object().cloned().unwrap_or_default();
    let (record, created) = library.add_store_file(store, &file.id, attributes, CHUNKING, None).unwrap();
    assert!(created && record.status == StoreFileStatus::InProgress);
    assert!(library.complete_store_file(store, &file.id, &chunks(texts)).unwrap());
    file.id
}

fn new_store(library: &Library) -> String {
    library.create_store(Some("docs".into()), Map::new(), None, "stand-in", DIMS, Metric::Dot).unwrap().id
}

#[test]
fn stores_search_and_survive_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let (store, kernel, garden);
    {
        let library = Library::open(dir.path(), LibraryOptions::default()).unwrap();
        store = new_store(&library);
        kernel = ingest(
            &library,
            &store,
            "kernel.txt",
            &[
                "The scheduler picks the next runnable task.",
                "Interrupt handlers run with preemption disabled.",
            ],
            json!({"topic": "os", "year": 2024}),
        );
        garden = ingest(
            &library,
            &store,
            "garden.md",
            &["Tomatoes need full sun and deep watering.", "Prune basil above a leaf pair."],
            json!({"topic": "garden", "year": 2020}),
        );
        let hits = library
            .search(std::slice::from_ref(&store), &request("which task does the scheduler run next"))
            .unwrap();
        assert_eq!(hits[0].file_id, kernel);
        assert_eq!(hits[0].filename, "kernel.txt");
        assert_eq!(hits[0].position, 0);
        assert!(hits[0].dense.is_some() && hits[0].lexical.is_some(), "{:?}", hits[0]);
        assert!(hits[0].score > 0.9 && hits[0].score <= 1.0, "first in both rankings: {}", hits[0].score);
        let counts = library.store(&store).unwrap().file_counts;
        assert_eq!((counts.completed, counts.total), (2, 2));
        assert!(library.verify(&store).unwrap().agrees());
    }
    // Reopened: the same answers from the saved indexes.
    let library = Library::open(dir.path(), LibraryOptions::default()).unwrap();
    let consistency = library.verify(&store).unwrap();
    assert!(consistency.agrees() && consistency.chunks == 4, "{consistency:?}");
    let hits = library.search(std::slice::from_ref(&store), &request("watering tomatoes in sun")).unwrap();
    assert_eq!(hits[0].file_id, garden);
    assert_eq!(hits[0].text, "Tomatoes need full sun and deep watering.");
    assert_eq!(library.file_bytes(&kernel).unwrap().len() as u64, library.file(&kernel).unwrap().bytes);
}

#[test]
fn a_data_directory_has_one_library_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let first = Library::open(dir.path(), LibraryOptions::default()).unwrap();
    let Err(second) = Library::open(dir.path(), LibraryOptions::default()) else {
        panic!("a second library opened the same directory")
    };
    let message = second.to_string();
    assert!(matches!(second, hearth_rag::RagError::Locked { .. }), "{second:?}");
    let pid = std::process::id().to_string();
    assert!(message.contains("is in use by process") && message.contains(&pid), "{message}");
    drop(first);
    Library::open(dir.path(), LibraryOptions::default()).expect("the directory is free once closed");
}

#[test]
fn filters_restrict_both_rankings() {
    let dir = tempfile::tempdir().unwrap();
    let library = Library::open(dir.path(), LibraryOptions::default()).unwrap();
    let store = new_store(&library);
    let old =
        ingest(&library, &store, "a.txt", &["rust ownership and borrowing rules"], json!({"year": 2019}));
    let new = ingest(&library, &store, "b.txt", &["borrowing books from the library"], json!({"year": 2024}));
    let mut query = request("rust ownership borrowing");
    query.filter = Some(Filter::parse(&json!({"type": "gte", "key": "year", "value": 2020})).unwrap());
    let hits = library.search(std::slice::from_ref(&store), &query).unwrap();
    assert!(hits.iter().all(|h| h.file_id == new), "{hits:?}");
    assert!(!hits.is_empty());
    query.filter = Some(Filter::parse(&json!({"type": "eq", "key": "year", "value": 1999})).unwrap());
    assert!(library.search(std::slice::from_ref(&store), &query).unwrap().is_empty());
    query.filter = None;
    assert_eq!(library.search(&[store], &query).unwrap()[0].file_id, old);
}

#[test]
fn removed_files_leave_both_indexes_and_stay_removed_after_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let store;
    {
        let library = Library::open(dir.path(), LibraryOptions::default()).unwrap();
        store = new_store(&library);
        let gone = ingest(
            &library,
            &store,
            "gone.txt",
            &["zebra migration across the savanna", "zebra stripes"],
            json!({}),
        );
        ingest(&library, &store, "kept.txt", &["penguins huddle in antarctic winter"], json!({}));
        library.remove_store_file(&store, &gone).unwrap();
        let hits = library.search(std::slice::from_ref(&store), &request("zebra")).unwrap();
        assert!(hits.iter().all(|h| h.file_id != gone), "{hits:?}");
        let consistency = library.verify(&store).unwrap();
        assert!(consistency.agrees() && consistency.chunks == 1, "{consistency:?}");
        assert!(library.store_file(&store, &gone).is_err());
        // The file itself stays until deleted; deleting it removes it from every store.
        let other = new_store(&library);
        let file = library.create_file("x.txt", "assistants", b"ostrich").unwrap();
        library.add_store_file(&other, &file.id, Map::new(), CHUNKING, None).unwrap();
        library.complete_store_file(&other, &file.id, &chunks(&["ostrich"])).unwrap();
        library.delete_file(&file.id).unwrap();
        assert!(library.verify(&other).unwrap().chunks == 0);
        assert!(library.file(&file.id).is_err());
        library.delete_store(&other).unwrap();
        assert!(library.store(&other).is_err());
        assert!(!dir.path().join("stores").join(&other).exists());
    }
    let library = Library::open(dir.path(), LibraryOptions::default()).unwrap();
    assert!(library.verify(&store).unwrap().agrees());
    assert!(library
        .search(&[store], &request("zebra stripes"))
        .unwrap()
        .iter()
        .all(|h| !h.text.contains("zebra")));
}

#[test]
fn ingest_after_removal_or_cancel_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let library = Library::open(dir.path(), LibraryOptions::default()).unwrap();
    let store = new_store(&library);
    let file = library.create_file("a.txt", "assistants", b"late").unwrap();
    library.add_store_file(&store, &file.id, Map::new(), CHUNKING, None).unwrap();
    library.remove_store_file(&store, &file.id).unwrap();
    assert!(!library.complete_store_file(&store, &file.id, &chunks(&["late"])).unwrap());
    let batch = library.create_batch(&store).unwrap();
    library.add_store_file(&store, &file.id, Map::new(), CHUNKING, Some(&batch)).unwrap();
    library.cancel_batch(&store, &batch).unwrap();
    assert!(!library.complete_store_file(&store, &file.id, &chunks(&["late"])).unwrap());
    let (_, cancelled, counts) = library.batch(&store, &batch).unwrap();
    assert!(cancelled && counts.cancelled == 1 && counts.total == 1);
    assert_eq!(library.verify(&store).unwrap().chunks, 0);
}

#[test]
fn wrong_dimensions_are_refused_with_both_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let library = Library::open(dir.path(), LibraryOptions::default()).unwrap();
    let store = new_store(&library);
    let file = library.create_file("a.txt", "assistants", b"x").unwrap();
    library.add_store_file(&store, &file.id, Map::new(), CHUNKING, None).unwrap();
    let bad = vec![NewChunk { position: 0, text: "x".into(), vector: vec![0.5; 32] }];
    let error = library.complete_store_file(&store, &file.id, &bad).unwrap_err();
    assert!(error.to_string().contains("64") && error.to_string().contains("32"), "{error}");
    let mut query = request("x");
    query.vector = Some(vec![0.1; 8]);
    assert!(library.search(&[store], &query).unwrap_err().is_client_error());
}

#[test]
fn lists_page_by_cursor_in_both_orders() {
    let dir = tempfile::tempdir().unwrap();
    let library = Library::open(dir.path(), LibraryOptions::default()).unwrap();
    let ids: Vec<String> =
        (0..5).map(|i| library.create_file(&format!("{i}.txt"), "assistants", b"x").unwrap().id).collect();
    library.create_file("other.jsonl", "batch", b"x").unwrap();
    let first =
        library.list_files(Some("assistants"), &PageRequest { limit: 2, ..PageRequest::default() }).unwrap();
    assert_eq!(first.items.iter().map(|f| f.id.as_str()).collect::<Vec<_>>(), [&ids[4], &ids[3]]);
    assert!(first.has_more);
    let next = PageRequest { limit: 10, after: Some(ids[3].clone()), ..PageRequest::default() };
    let rest = library.list_files(Some("assistants"), &next).unwrap();
    assert_eq!(rest.items.iter().map(|f| f.id.as_str()).collect::<Vec<_>>(), [&ids[2], &ids[1], &ids[0]]);
    assert!(!rest.has_more);
    let ascending = PageRequest { limit: 10, order: hearth_rag::ListOrder::Asc, ..PageRequest::default() };
    assert_eq!(library.list_files(None, &ascending).unwrap().items.len(), 6);
    let bad = PageRequest { after: Some("file-nope".into()), ..PageRequest::default() };
    assert!(library.list_files(None, &bad).is_err());
}

/// The crash test's child: ingests files forever (removing every fifth, saving the indexes now
/// and then) and prints each acknowledged file id; the parent kills it with SIGKILL.
#[test]
fn crash_child() {
    let Some(dir) = std::env::var_os("HEARTH_RAG_CRASH_DIR") else { return };
    let library = Library::open(Path::new(&dir), LibraryOptions::default()).unwrap();
    let store = new_store(&library);
    println!("store {store}");
    for i in 0.. {
        let texts: Vec<String> =
            (0..20).map(|j| format!("document {i} paragraph {j} about topic{}", (i * 7 + j) % 13)).collect();
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let id = ingest(&library, &store, &format!("{i}.txt"), &refs, json!({"i": i}));
        if i % 5 == 4 {
            library.remove_store_file(&store, &id).unwrap();
            println!("removed {id}");
        } else {
            println!("acked {id}");
        }
        if i % 7 == 6 {
            library.flush().unwrap();
        }
    }
}

#[test]
fn a_kill_during_ingest_loses_no_acknowledged_file_and_indexes_agree() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["crash_child", "--exact", "--nocapture", "--test-threads", "1"])
        .env("HEARTH_RAG_CRASH_DIR", dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let (mut store, mut acked, mut removed) = (String::new(), Vec::new(), Vec::new());
    let started = Instant::now();
    while acked.len() < 40 && started.elapsed() < Duration::from_secs(120) {
        let Some(Ok(line)) = lines.next() else { break };
        // libtest's own `test crash_child ... ` may share the first line.
        if let Some((_, id)) = line.split_once("store ") {
            store = id.to_string();
        } else if let Some(id) = line.strip_prefix("acked ") {
            acked.push(id.to_string());
        } else if let Some(id) = line.strip_prefix("removed ") {
            removed.push(id.to_string());
        }
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(acked.len() >= 40, "the child acknowledged only {} files", acked.len());

    let library = Library::open(dir.path(), LibraryOptions::default()).unwrap();
    let consistency = library.verify(&store).unwrap();
    assert!(consistency.agrees(), "after the crash: {consistency:?}");
    for id in &acked {
        assert_eq!(library.store_file(&store, id).unwrap().status, StoreFileStatus::Completed, "{id}");
    }
    for id in &removed {
        assert!(library.store_file(&store, id).is_err(), "removed {id} came back");
    }
    // Every acknowledged file is findable by its own words, in both rankings.
    let last = acked.last().unwrap();
    let i: usize = library.file(last).unwrap().filename.trim_end_matches(".txt").parse().unwrap();
    let hits =
        library.search(std::slice::from_ref(&store), &request(&format!("document {i} paragraph 3"))).unwrap();
    assert_eq!(&hits[0].file_id, last);
    assert!(hits[0].dense.is_some() && hits[0].lexical.is_some());
    // A file the kill interrupted is still `in_progress`, for the server to ingest again.
    for pending in library.pending().unwrap() {
        assert!(!acked.contains(&pending.file_id));
    }
}
