//! Text out of an uploaded file: plain text and Markdown as they are, HTML's visible text, PDF's
//! text layer, JSON as `path: value` lines. The format comes from the file name's extension, or
//! from the content when the name has none the store knows.

use crate::RagError;

/// Largest width html2text lays text out at: wide enough that it never wraps a paragraph.
const HTML_WIDTH: usize = 100_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Text,
    Markdown,
    Html,
    Pdf,
    Json,
}

/// Extensions read as plain text besides `.txt`: source code, configs, logs, tables.
const TEXT_EXTENSIONS: &[&str] = &[
    "txt", "text", "log", "csv", "tsv", "rst", "adoc", "org", "tex", "ini", "cfg", "conf", "toml", "yaml",
    "yml", "xml", "py", "rs", "c", "h", "cc", "cpp", "hpp", "go", "java", "js", "ts", "tsx", "jsx", "rb",
    "php", "sh", "css", "sql", "kt", "swift", "cs",
];

impl Format {
    /// The format a file name's extension names, if the store reads it.
    pub fn from_name(name: &str) -> Option<Self> {
        let extension = name.rsplit_once('.')?.1.to_ascii_lowercase();
        Some(match extension.as_str() {
            "md" | "markdown" | "mdx" => Self::Markdown,
            "html" | "htm" | "xhtml" => Self::Html,
            "pdf" => Self::Pdf,
            "json" | "jsonl" | "ndjson" => Self::Json,
            e if TEXT_EXTENSIONS.contains(&e) => Self::Text,
            _ => return None,
        })
    }

    /// The format of content whose name says nothing.
    pub fn sniff(bytes: &[u8]) -> Option<Self> {
        if bytes.starts_with(b"%PDF-") {
            return Some(Self::Pdf);
        }
        let text = std::str::from_utf8(bytes).ok()?;
        let start = text.trim_start_matches('\u{feff}').trim_start();
        let lower: String = start.chars().take(64).collect::<String>().to_ascii_lowercase();
        if lower.starts_with("<!doctype html") || lower.starts_with("<html") {
            return Some(Self::Html);
        }
        if (start.starts_with('{') || start.starts_with('['))
            && serde_json::from_str::<serde_json::Value>(text).is_ok()
        {
            return Some(Self::Json);
        }
        Some(Self::Text)
    }
}

/// The text of `bytes`, read as `name` says (or as its content says). An empty result, a binary
/// file, an unreadable PDF or malformed JSON is [`RagError::Unsupported`] naming the problem.
pub fn extract(name: &str, bytes: &[u8]) -> Result<String, RagError> {
    let format = match Format::from_name(name) {
        Some(format) => format,
        None => Format::sniff(bytes).ok_or_else(|| {
            RagError::Unsupported(format!(
                "file `{name}` is neither UTF-8 text nor a format the store reads (text, Markdown, HTML, PDF, JSON)"
            ))
        })?,
    };
    let text = match format {
        Format::Text | Format::Markdown => utf8(name, bytes)?.trim_start_matches('\u{feff}').to_string(),
        Format::Html => html(name, bytes)?,
        Format::Pdf => pdf(name, bytes)?,
        Format::Json => json(name, bytes)?,
    };
    if text.trim().is_empty() {
        return Err(RagError::Unsupported(format!("file `{name}` has no text to index")));
    }
    Ok(text)
}

fn utf8<'a>(name: &str, bytes: &'a [u8]) -> Result<&'a str, RagError> {
    std::str::from_utf8(bytes).map_err(|e| {
        RagError::Unsupported(format!(
            "file `{name}` is not UTF-8 text (invalid byte at offset {})",
            e.valid_up_to()
        ))
    })
}

fn html(name: &str, bytes: &[u8]) -> Result<String, RagError> {
    let text = utf8(name, bytes)?;
    let plain = html2text::config::plain()
        .no_link_wrapping()
        .string_from_read(text.as_bytes(), HTML_WIDTH)
        .map_err(|e| RagError::Unsupported(format!("cannot read the HTML of `{name}`: {e}")))?;
    // html2text keeps lines as laid out; trailing spaces are its padding.
    Ok(plain.lines().map(str::trim_end).collect::<Vec<_>>().join("\n"))
}

fn pdf(name: &str, bytes: &[u8]) -> Result<String, RagError> {
    let document = lopdf::Document::load_mem(bytes)
        .map_err(|e| RagError::Unsupported(format!("cannot read `{name}` as a PDF: {e}")))?;
    if document.is_encrypted() {
        return Err(RagError::Unsupported(format!("PDF `{name}` is encrypted")));
    }
    let pages: Vec<u32> = document.get_pages().keys().copied().collect();
    let mut text = String::new();
    for (page, result) in pages.iter().zip(document.extract_text_chunks(&pages)) {
        match result {
            Ok(page_text) => {
                if !text.is_empty() {
                    text.push('\n');
                }
                text.push_str(page_text.trim_end());
            }
            Err(e) => tracing::debug!(file = name, page, error = %e, "a PDF page has no readable text"),
        }
    }
    if text.trim().is_empty() {
        return Err(RagError::Unsupported(format!(
            "PDF `{name}` has no text layer (a scanned document needs OCR first)"
        )));
    }
    Ok(text)
}

/// JSON (one document, or JSON Lines) as `path: value` lines, so both keys and values are searchable.
fn json(name: &str, bytes: &[u8]) -> Result<String, RagError> {
    let text = utf8(name, bytes)?;
    let mut out = String::new();
    match serde_json::from_str::<serde_json::Value>(text) {
        Ok(value) => flatten(&value, &mut String::new(), &mut out),
        Err(whole) => {
            // JSON Lines: one value per non-empty line.
            for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
                let value: serde_json::Value = serde_json::from_str(line).map_err(|_| {
                    RagError::Unsupported(format!(
                        "file `{name}` is not valid JSON: {whole} (line {})",
                        i + 1
                    ))
                })?;
                flatten(&value, &mut format!("[{i}]"), &mut out);
            }
        }
    }
    Ok(out)
}

fn flatten(value: &serde_json::Value, path: &mut String, out: &mut String) {
    use serde_json::Value;
    let leaf = |path: &str, text: &str, out: &mut String| {
        if path.is_empty() {
            out.push_str(text);
        } else {
            out.push_str(path);
            out.push_str(": ");
            out.push_str(text);
        }
        out.push('\n');
    };
    match value {
        Value::Object(map) => {
            for (key, item) in map {
                let len = path.len();
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(key);
                flatten(item, path, out);
                path.truncate(len);
            }
        }
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                flatten(item, path, out);
                path.truncate(len);
            }
        }
        Value::String(s) => leaf(path, s, out),
        Value::Null => {}
        other => leaf(path, &other.to_string(), out),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_come_from_the_name_then_the_content() {
        assert_eq!(Format::from_name("notes.MD"), Some(Format::Markdown));
        assert_eq!(Format::from_name("a.tar.gz"), None);
        assert_eq!(Format::sniff(b"%PDF-1.7 ..."), Some(Format::Pdf));
        assert_eq!(Format::sniff(b"  <!DOCTYPE html><p>x</p>"), Some(Format::Html));
        assert_eq!(Format::sniff(b"{\"a\": 1}"), Some(Format::Json));
        assert_eq!(Format::sniff(b"{not json"), Some(Format::Text));
        assert_eq!(Format::sniff(&[0xff, 0xfe, 0x00]), None);
    }

    #[test]
    fn html_keeps_visible_text_only() {
        let page = b"<html><head><title>T</title><style>p{color:red}</style><script>var x=1;</script></head>\
            <body><h1>Kernel</h1><p>The <b>scheduler</b> runs tasks.</p></body></html>";
        let text = extract("page.html", page).unwrap();
        assert!(text.contains("Kernel") && text.contains("The scheduler runs tasks."), "{text}");
        assert!(!text.contains("color:red") && !text.contains("var x"), "{text}");
    }

    #[test]
    fn json_becomes_path_value_lines() {
        let text = extract(
            "d.json",
            br#"{"name": "hearth", "tags": ["rag", 2], "nested": {"ok": true, "n": null}}"#,
        )
        .unwrap();
        // Keys in serde_json's map order (sorted).
        assert_eq!(text, "name: hearth\nnested.ok: true\ntags[0]: rag\ntags[1]: 2\n");
        let lines = extract("d.jsonl", b"{\"a\": 1}\n\n{\"a\": 2}\n").unwrap();
        assert_eq!(lines, "[0].a: 1\n[2].a: 2\n");
        let bad = extract("d.json", b"{\"a\": ").unwrap_err();
        assert!(bad.to_string().contains("not valid JSON"), "{bad}");
    }

    #[test]
    fn unreadable_files_are_named_problems() {
        for (name, bytes, expected) in [
            ("x.bin", &[0u8, 159, 146, 150][..], "neither UTF-8 text"),
            ("x.txt", &[0xc3, 0x28][..], "not UTF-8"),
            ("x.txt", b"   \n\t"[..].as_ref(), "no text"),
            ("x.pdf", b"%PDF-1.4 garbage"[..].as_ref(), "cannot read"),
        ] {
            let error = extract(name, bytes).unwrap_err();
            assert!(error.to_string().contains(expected), "{name}: {error}");
            assert!(error.is_client_error());
        }
    }

    /// A one-page PDF written with lopdf, the way a text-layer PDF is laid out.
    pub(crate) fn tiny_pdf(lines: &[&str]) -> Vec<u8> {
        use lopdf::content::{Content, Operation};
        use lopdf::{dictionary, Document, Object, Stream};
        let mut doc = Document::with_version("1.5");
        let pages_id = doc.new_object_id();
        let font_id = doc.add_object(dictionary! {
            "Type" => "Font", "Subtype" => "Type1", "BaseFont" => "Courier",
        });
        let resources_id = doc.add_object(dictionary! { "Font" => dictionary! { "F1" => font_id } });
        let mut operations = vec![
            Operation::new("BT", vec![]),
            Operation::new("Tf", vec!["F1".into(), 12.into()]),
            Operation::new("Td", vec![72.into(), 720.into()]),
        ];
        for line in lines {
            operations.push(Operation::new("Tj", vec![Object::string_literal(*line)]));
            operations.push(Operation::new("Td", vec![0.into(), (-16).into()]));
        }
        operations.push(Operation::new("ET", vec![]));
        let content = Content { operations };
        let content_id = doc.add_object(Stream::new(dictionary! {}, content.encode().unwrap()));
        let page_id = doc.add_object(dictionary! {
            "Type" => "Page", "Parent" => pages_id, "Contents" => content_id,
        });
        let pages = dictionary! {
            "Type" => "Pages", "Kids" => vec![page_id.into()], "Count" => 1,
            "Resources" => resources_id, "MediaBox" => vec![0.into(), 0.into(), 595.into(), 842.into()],
        };
        doc.objects.insert(pages_id, Object::Dictionary(pages));
        let catalog_id = doc.add_object(dictionary! { "Type" => "Catalog", "Pages" => pages_id });
        doc.trailer.set("Root", catalog_id);
        let mut bytes = Vec::new();
        doc.save_to(&mut bytes).unwrap();
        bytes
    }

    #[test]
    fn pdf_text_layer_is_read() {
        let bytes = tiny_pdf(&["Hearth indexes PDF files.", "Second line here."]);
        let text = extract("report.pdf", &bytes).unwrap();
        assert!(text.contains("Hearth indexes PDF files."), "{text:?}");
        assert!(text.contains("Second line here."), "{text:?}");
        // Without a name, the content says it is a PDF.
        assert!(extract("upload", &bytes).unwrap().contains("Hearth"));
    }
}
