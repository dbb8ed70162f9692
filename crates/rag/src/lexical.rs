//! One vector store's BM25 index: tantivy over the chunks' text (its default tokenizer: split at
//! non-alphanumerics, lower-cased; BM25 with k1 1.2, b 0.75), with the chunk key and the file key
//! as fast fields. Each commit records in its payload how far into SQLite's log the index is, so
//! a store reopened after a crash replays only the rest.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

use tantivy::collector::{FilterCollector, TopDocs};
use tantivy::query::{BooleanQuery, Occur, Query, TermQuery};
use tantivy::schema::{
    Field, IndexRecordOption, Schema, TextFieldIndexing, TextOptions, FAST, INDEXED, STORED,
};
use tantivy::{doc, Index, IndexReader, IndexWriter, ReloadPolicy, TantivyDocument, Term};

use crate::dense::Watermark;
use crate::RagError;

/// The writer's indexing memory (tantivy's minimum is 15 MB); one indexing thread.
const WRITER_BYTES: usize = 32 * 1024 * 1024;
/// Query terms beyond these are ignored (a pasted page as a query).
const MAX_QUERY_TERMS: usize = 256;

pub struct LexicalIndex {
    store: String,
    index: Index,
    writer: IndexWriter<TantivyDocument>,
    reader: IndexReader,
    key: Field,
    file: Field,
    text: Field,
    applied: Watermark,
    /// Changes since the last commit.
    pending: bool,
}

fn lexical_error(store: &str, message: impl std::fmt::Display) -> RagError {
    RagError::Lexical { store: store.to_string(), message: message.to_string() }
}

fn schema() -> Schema {
    let mut builder = Schema::builder();
    builder.add_u64_field("key", INDEXED | STORED | FAST);
    builder.add_u64_field("file", INDEXED | FAST);
    let indexing =
        TextFieldIndexing::default().set_tokenizer("default").set_index_option(IndexRecordOption::WithFreqs);
    builder.add_text_field("text", TextOptions::default().set_indexing_options(indexing));
    builder.build()
}

impl LexicalIndex {
    /// The index in `dir` (created if absent). An index that cannot be opened is recreated
    /// empty, to be rebuilt from SQLite.
    pub fn open(store: &str, dir: &Path) -> Result<Self, RagError> {
        std::fs::create_dir_all(dir).map_err(|e| RagError::at(dir, "create", e))?;
        let index = match Index::open_in_dir(dir) {
            Ok(index) if index.schema() == schema() => index,
            opened => {
                if let Err(e) = &opened {
                    if dir.join("meta.json").exists() {
                        tracing::warn!(store, error = %e, "cannot open the BM25 index; rebuilding it");
                    }
                }
                std::fs::remove_dir_all(dir).map_err(|e| RagError::at(dir, "clear", e))?;
                std::fs::create_dir_all(dir).map_err(|e| RagError::at(dir, "create", e))?;
                Index::create_in_dir(dir, schema()).map_err(|e| lexical_error(store, e))?
            }
        };
        let applied = index
            .load_metas()
            .map_err(|e| lexical_error(store, e))?
            .payload
            .and_then(|p| serde_json::from_str::<Watermark>(&p).ok())
            .unwrap_or_default();
        let writer = index.writer_with_num_threads(1, WRITER_BYTES).map_err(|e| lexical_error(store, e))?;
        let reader = index
            .reader_builder()
            .reload_policy(ReloadPolicy::Manual)
            .try_into()
            .map_err(|e| lexical_error(store, e))?;
        let s = index.schema();
        let field = |name| s.get_field(name).expect("the schema has its fields");
        let (key, file, text) = (field("key"), field("file"), field("text"));
        Ok(Self { store: store.into(), index, writer, reader, key, file, text, applied, pending: false })
    }

    pub fn applied(&self) -> Watermark {
        self.applied
    }

    /// Changes not yet committed (invisible to searches).
    pub fn pending(&self) -> bool {
        self.pending
    }

    pub fn len(&self) -> u64 {
        self.reader.searcher().num_docs()
    }

    /// Adds chunks (`key`, `file key`, text, sequence number); `replace` first deletes each key
    /// (a replay, where the index may already hold some).
    pub fn add(&mut self, chunks: &[(u64, u64, &str, i64)], replace: bool) -> Result<(), RagError> {
        for &(key, file, text, seq) in chunks {
            if replace {
                self.writer.delete_term(Term::from_field_u64(self.key, key));
            }
            self.writer
                .add_document(doc!(self.key => key, self.file => file, self.text => text))
                .map_err(|e| lexical_error(&self.store, e))?;
            self.applied.seq = self.applied.seq.max(seq);
        }
        self.pending |= !chunks.is_empty();
        Ok(())
    }

    pub fn remove(&mut self, keys: &[u64], removal: i64) {
        for &key in keys {
            self.writer.delete_term(Term::from_field_u64(self.key, key));
        }
        self.applied.removal = self.applied.removal.max(removal);
        self.pending = true;
    }

    /// Makes the changes durable and visible to searches, with the watermark in the commit.
    pub fn commit(&mut self) -> Result<(), RagError> {
        if !self.pending {
            return Ok(());
        }
        let payload = serde_json::to_string(&self.applied).expect("a watermark serializes");
        let mut prepared = self.writer.prepare_commit().map_err(|e| lexical_error(&self.store, e))?;
        prepared.set_payload(&payload);
        prepared.commit().map_err(|e| lexical_error(&self.store, e))?;
        self.reader.reload().map_err(|e| lexical_error(&self.store, e))?;
        self.pending = false;
        Ok(())
    }

    /// The `count` best chunks for `query` by BM25, as (key, score), restricted to the file keys
    /// in `files` when given.
    pub fn search(
        &self,
        query: &str,
        count: usize,
        files: Option<Arc<HashSet<u64>>>,
    ) -> Result<Vec<(u64, f32)>, RagError> {
        if count == 0 {
            return Ok(Vec::new());
        }
        let mut analyzer =
            self.index.tokenizer_for_field(self.text).map_err(|e| lexical_error(&self.store, e))?;
        let mut stream = analyzer.token_stream(query);
        let mut seen = HashSet::new();
        let mut clauses: Vec<(Occur, Box<dyn Query>)> = Vec::new();
        while stream.advance() {
            let token = &stream.token().text;
            if clauses.len() < MAX_QUERY_TERMS && seen.insert(token.clone()) {
                let term = Term::from_field_text(self.text, token);
                clauses.push((Occur::Should, Box::new(TermQuery::new(term, IndexRecordOption::WithFreqs))));
            }
        }
        if clauses.is_empty() {
            return Ok(Vec::new());
        }
        let query = BooleanQuery::new(clauses);
        let searcher = self.reader.searcher();
        let top = match files {
            None => searcher.search(&query, &TopDocs::with_limit(count).order_by_score()),
            Some(files) => {
                let collector = FilterCollector::new(
                    "file".to_string(),
                    move |file: u64| files.contains(&file),
                    TopDocs::with_limit(count).order_by_score(),
                );
                searcher.search(&query, &collector)
            }
        }
        .map_err(|e| lexical_error(&self.store, e))?;
        let mut hits = Vec::with_capacity(top.len());
        for (score, address) in top {
            let keys = searcher
                .segment_reader(address.segment_ord)
                .fast_fields()
                .u64("key")
                .map_err(|e| lexical_error(&self.store, e))?;
            if let Some(key) = keys.first(address.doc_id) {
                hits.push((key, score));
            }
        }
        Ok(hits)
    }
}
