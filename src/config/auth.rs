//! `[auth]`: API keys, their classes and rate limits. Keys come from the config file
//! (`[[auth.keys]]`), from a keys file (`keys_file`, one key per line) and from `HEARTH_API_KEY`.
//! Only their SHA-256 digests are kept: no key survives parsing, and no error message repeats one.
//!
//! Keys file format, one key per line (`#` starts a comment):
//!
//! ```text
//! # key (or sha256:<hex digest of it>)   name        options
//! hk-2f0c9a8b7e6d5c4b3a29180716f5e4d3   open-webui  class=premium rpm=600 tpm=200000
//! sha256:9b74c9897bac770ffc029102a200c5de…  batch-jobs
//! ```

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::{invalid, ConfigError};

/// Shortest key accepted in plain text: long enough that guessing is hopeless.
pub const MIN_KEY_CHARS: usize = 16;

/// A key's scheduling class: premium requests overtake standard ones (without starving them).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyClass {
    Premium,
    #[default]
    Standard,
}

impl KeyClass {
    fn parse(text: &str) -> Option<Self> {
        match text {
            "premium" => Some(Self::Premium),
            "standard" => Some(Self::Standard),
            _ => None,
        }
    }
}

impl fmt::Display for KeyClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Premium => "premium",
            Self::Standard => "standard",
        })
    }
}

/// A key's SHA-256 digest. Its `Debug` shows nothing of it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct KeyDigest(pub [u8; 32]);

impl KeyDigest {
    pub fn of(key: &str) -> Self {
        Self(Sha256::digest(key.as_bytes()).into())
    }

    fn from_hex(hex: &str) -> Option<Self> {
        if hex.len() != 64 || !hex.is_ascii() {
            return None;
        }
        let mut digest = [0u8; 32];
        for (i, byte) in digest.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(Self(digest))
    }
}

impl fmt::Debug for KeyDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KeyDigest(<redacted>)")
    }
}

/// Per-key rate limits; `None`: unlimited.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateLimits {
    pub requests_per_minute: Option<u64>,
    /// Tokens read and generated (prompt, input and completion tokens) per minute.
    pub tokens_per_minute: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiKey {
    /// Names the key in logs and metrics (never the key itself).
    pub name: Arc<str>,
    pub class: KeyClass,
    pub digest: KeyDigest,
    pub limits: RateLimits,
    /// May load, unload and reload models (`/admin/…`).
    pub admin: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuthConfig {
    /// Empty: the server is open (a loud warning when it listens beyond loopback).
    pub keys: Vec<ApiKey>,
    /// Where file keys came from, for `hearth check`.
    pub keys_file: Option<PathBuf>,
    /// `/metrics` needs a key too (it is open by default, for scrapers).
    pub metrics_require_key: bool,
}

impl AuthConfig {
    pub fn enabled(&self) -> bool {
        !self.keys.is_empty()
    }
}

/// A secret from the command line or the environment; its `Debug` shows nothing of it.
#[derive(Clone, Default)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAuth {
    keys_file: Option<String>,
    metrics_require_key: Option<bool>,
    /// Limits of keys that set none of their own.
    requests_per_minute: Option<u64>,
    tokens_per_minute: Option<u64>,
    #[serde(default)]
    keys: Vec<RawKey>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawKey {
    name: Option<String>,
    key: Option<Secret>,
    sha256: Option<String>,
    class: Option<KeyClass>,
    requests_per_minute: Option<u64>,
    tokens_per_minute: Option<u64>,
    admin: Option<bool>,
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer).map(Secret)
    }
}

/// Where keys come from besides the file: `--api-keys-file` / `HEARTH_API_KEYS_FILE` (replaces
/// `keys_file`) and `HEARTH_API_KEY` (one more key, named `env`).
#[derive(Clone, Debug, Default)]
pub struct AuthOverrides {
    pub keys_file: Option<PathBuf>,
    pub api_key: Option<Secret>,
}

pub(super) fn validate(
    raw: RawAuth,
    overrides: &AuthOverrides,
    base: Option<&Path>,
) -> Result<AuthConfig, ConfigError> {
    let defaults = RateLimits {
        requests_per_minute: at_least_one("auth.requests_per_minute", raw.requests_per_minute)?,
        tokens_per_minute: at_least_one("auth.tokens_per_minute", raw.tokens_per_minute)?,
    };
    let mut keys = Vec::new();
    for (i, key) in raw.keys.into_iter().enumerate() {
        let field = |name: &str| format!("auth.keys[{i}].{name}");
        let digest = match (&key.key, &key.sha256) {
            (Some(secret), None) => plain_key(&secret.0).map_err(|m| invalid(field("key"), m))?,
            (None, Some(hex)) => KeyDigest::from_hex(hex).ok_or_else(|| {
                invalid(field("sha256"), "must be 64 hex digits (the SHA-256 digest of the key)")
            })?,
            _ => return Err(invalid(format!("auth.keys[{i}]"), "set exactly one of `key` and `sha256`")),
        };
        let name = key.name.unwrap_or_else(|| format!("key-{i}"));
        keys.push(ApiKey {
            name: valid_name(&name).map_err(|m| invalid(field("name"), m))?,
            class: key.class.unwrap_or_default(),
            digest,
            limits: RateLimits {
                requests_per_minute: at_least_one(&field("requests_per_minute"), key.requests_per_minute)?
                    .or(defaults.requests_per_minute),
                tokens_per_minute: at_least_one(&field("tokens_per_minute"), key.tokens_per_minute)?
                    .or(defaults.tokens_per_minute),
            },
            admin: key.admin.unwrap_or(false),
        });
    }
    let keys_file = match (&overrides.keys_file, raw.keys_file) {
        (Some(path), _) => Some(path.clone()),
        (None, Some(path)) => Some(resolve(&path, base)),
        (None, None) => None,
    };
    if let Some(path) = &keys_file {
        let text = std::fs::read_to_string(path).map_err(|e| {
            invalid("auth.keys_file", format!("cannot read the keys file {}: {e}", path.display()))
        })?;
        let from_file = parse_keys_file(&text, defaults)
            .map_err(|(line, m)| invalid("auth.keys_file", format!("{}:{line}: {m}", path.display())))?;
        if from_file.is_empty() {
            return Err(invalid(
                "auth.keys_file",
                format!("{} holds no keys; an empty keys file would leave the server open", path.display()),
            ));
        }
        keys.extend(from_file);
    }
    if let Some(secret) = &overrides.api_key {
        let digest = plain_key(&secret.0).map_err(|m| invalid("HEARTH_API_KEY", m))?;
        keys.push(ApiKey {
            name: "env".into(),
            class: KeyClass::Standard,
            digest,
            limits: defaults,
            admin: false,
        });
    }
    let mut names = HashSet::new();
    let mut digests = HashSet::new();
    for key in &keys {
        if !names.insert(Arc::clone(&key.name)) {
            return Err(invalid("auth.keys", format!("the key name `{}` is used twice", key.name)));
        }
        if !digests.insert(key.digest.0) {
            return Err(invalid("auth.keys", format!("the key named `{}` is listed twice", key.name)));
        }
    }
    Ok(AuthConfig { keys, keys_file, metrics_require_key: raw.metrics_require_key.unwrap_or(false) })
}

/// A relative keys-file path is relative to the config file's directory.
fn resolve(path: &str, base: Option<&Path>) -> PathBuf {
    let path = super::expand_home(path);
    match base.and_then(Path::parent) {
        Some(dir) if path.is_relative() => dir.join(path),
        _ => path,
    }
}

fn at_least_one(field: &str, value: Option<u64>) -> Result<Option<u64>, ConfigError> {
    match value {
        Some(0) => Err(invalid(field, "must be at least 1; leave it unset for no limit")),
        other => Ok(other),
    }
}

/// A key given in plain text: printable ASCII without spaces, at least [`MIN_KEY_CHARS`] long.
/// Messages never repeat the key.
fn plain_key(key: &str) -> Result<KeyDigest, String> {
    if !key.chars().all(|c| c.is_ascii_graphic()) {
        return Err("a key must be printable ASCII without spaces".into());
    }
    if key.len() < MIN_KEY_CHARS {
        return Err(format!(
            "a key must have at least {MIN_KEY_CHARS} characters (e.g. from `openssl rand -hex 24`)"
        ));
    }
    Ok(KeyDigest::of(key))
}

/// Key names label metrics and logs: letters, digits and `._-`, at most 64.
fn valid_name(name: &str) -> Result<Arc<str>, String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    if ok {
        Ok(name.into())
    } else {
        Err(format!("`{name}` is not a key name; use 1 to 64 letters, digits and `._-`"))
    }
}

/// The keys of a keys file, or the (1-based) line and what is wrong with it.
fn parse_keys_file(text: &str, defaults: RateLimits) -> Result<Vec<ApiKey>, (usize, String)> {
    let mut keys = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let number = i + 1;
        let content = line.split('#').next().unwrap_or("").trim();
        if content.is_empty() {
            continue;
        }
        let mut fields = content.split_whitespace();
        let secret = fields.next().unwrap_or_default();
        let digest = match secret.strip_prefix("sha256:") {
            Some(hex) => KeyDigest::from_hex(hex)
                .ok_or_else(|| (number, "`sha256:` must be followed by 64 hex digits".to_string()))?,
            None => plain_key(secret).map_err(|m| (number, m))?,
        };
        let mut name = None;
        let mut class = KeyClass::Standard;
        let mut limits = defaults;
        let mut admin = false;
        for field in fields {
            match field.split_once('=') {
                None if name.is_none() => name = Some(valid_name(field).map_err(|m| (number, m))?),
                None => return Err((number, format!("unexpected `{field}`; options are `key=value`"))),
                Some(("class", value)) => {
                    class = KeyClass::parse(value).ok_or_else(|| {
                        (number, format!("unknown class `{value}`; use `premium` or `standard`"))
                    })?;
                }
                Some(("admin", value)) => {
                    admin = match value {
                        "true" => true,
                        "false" => false,
                        _ => {
                            return Err((number, format!("`admin` must be `true` or `false`, got `{value}`")))
                        }
                    };
                }
                Some((option @ ("rpm" | "tpm"), value)) => {
                    let n = value.parse::<u64>().ok().filter(|&n| n > 0).ok_or_else(|| {
                        (number, format!("`{option}` must be a whole number of at least 1, got `{value}`"))
                    })?;
                    if option == "rpm" {
                        limits.requests_per_minute = Some(n);
                    } else {
                        limits.tokens_per_minute = Some(n);
                    }
                }
                Some((option, _)) => {
                    return Err((
                        number,
                        format!("unknown option `{option}`; use `class`, `rpm`, `tpm` or `admin`"),
                    ))
                }
            }
        }
        let name = name.unwrap_or_else(|| format!("line-{number}").into());
        keys.push(ApiKey { name, class, digest, limits, admin });
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY_A: &str = "hk-aaaaaaaaaaaaaaaaaaaaaaaa";
    const KEY_B: &str = "hk-bbbbbbbbbbbbbbbbbbbbbbbb";

    #[test]
    fn keys_file_lines() {
        let digest_b: String = KeyDigest::of(KEY_B).0.iter().map(|b| format!("{b:02x}")).collect();
        let text = format!(
            "# comment\n\n{KEY_A}  webui class=premium rpm=60 tpm=1000 admin=true # trailing\nsha256:{digest_b}\n"
        );
        let defaults = RateLimits { requests_per_minute: Some(5), tokens_per_minute: None };
        let keys = parse_keys_file(&text, defaults).unwrap();
        assert_eq!(keys.len(), 2);
        assert_eq!(
            keys[0],
            ApiKey {
                name: "webui".into(),
                class: KeyClass::Premium,
                digest: KeyDigest::of(KEY_A),
                limits: RateLimits { requests_per_minute: Some(60), tokens_per_minute: Some(1000) },
                admin: true,
            }
        );
        assert!(!keys[1].admin);
        assert_eq!(&*keys[1].name, "line-4");
        assert_eq!(keys[1].digest, KeyDigest::of(KEY_B));
        assert_eq!((keys[1].class, keys[1].limits), (KeyClass::Standard, defaults));
    }

    #[test]
    fn bad_keys_file_lines_name_the_line_and_never_the_key() {
        let cases = [
            ("short-key", 1, "at least 16"),
            (&format!("{KEY_A} a b"), 1, "unexpected `b`"),
            (&format!("\n{KEY_A} a class=gold"), 2, "unknown class `gold`"),
            (&format!("{KEY_A} rpm=0"), 1, "`rpm` must be"),
            (&format!("{KEY_A} colour=red"), 1, "unknown option `colour`"),
            ("sha256:abc", 1, "64 hex digits"),
            (&format!("{KEY_A} bad/name"), 1, "not a key name"),
        ];
        for (text, line, needle) in cases {
            let (at, message) = parse_keys_file(text, RateLimits::default()).unwrap_err();
            assert_eq!(at, line, "{text}");
            assert!(message.contains(needle), "{text}: {message}");
            assert!(!message.contains(KEY_A) && !message.contains("short-key"), "{message}");
        }
    }

    #[test]
    fn digests_are_sha256_and_never_printed() {
        // The SHA-256 of "abc" (FIPS 180-2's first example).
        let hex = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(KeyDigest::of("abc"), KeyDigest::from_hex(hex).unwrap());
        let key = ApiKey {
            name: "n".into(),
            class: KeyClass::Standard,
            digest: KeyDigest::of(KEY_A),
            limits: RateLimits::default(),
            admin: false,
        };
        let shown = format!("{key:?} {:?}", Secret(KEY_A.into()));
        let hex_a: String = KeyDigest::of(KEY_A).0.iter().map(|b| format!("{b:02x}")).collect();
        assert!(!shown.contains(KEY_A) && !shown.contains(&hex_a[..8]), "{shown}");
    }
}
