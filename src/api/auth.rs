//! Who may do what: the auth file (`--auth-file`), a YAML list of principals, each known by
//! the SHA-256 of its bearer token or by its client certificate's subject CN, each with rules
//! granting verbs on queues.
//!
//! ```yaml
//! principals:
//!   - name: billing-api
//!     token_sha256: 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08
//!     rules:
//!       - {verbs: [manage, read], queues: ["billing.*"]}
//! ```
//!
//! The Scheduler service asks [`Auth::authenticate`] at the start of every call and
//! [`Caller::check`] with the verb and queue before anything is read or written (for calls
//! that name a job, after reading which queue it is in). Without an auth file every caller is
//! [`Caller::Open`] and may do everything. Tokens are hashed on arrival, compared in constant
//! time with every principal's hash, and never kept or logged.

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::Status;
use tonic::metadata::MetadataMap;
use tracing::{info, warn};

use super::reload::{Reloadable, fingerprint, spawn_reloader};
use super::tls::TlsPeer;
use crate::telemetry::metrics;

/// Counts a refused call.
fn refused(reason: &'static str, principal: &str) {
    metrics::instruments().auth_refusals.add(
        1,
        &[
            opentelemetry::KeyValue::new("tickd.reason", reason),
            opentelemetry::KeyValue::new("tickd.principal", principal.to_string()),
        ],
    );
}

/// What a call does to a queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verb {
    /// Schedule, BatchSchedule, Update, Pause, Resume, Cancel, Delete, Trigger, Backfill.
    Manage,
    /// GetJob, ListJobs, ListOccurrences, PreviewOccurrences.
    Read,
    /// Subscribe, Ack.
    Consume,
}

impl Verb {
    fn bit(self) -> u8 {
        match self {
            Verb::Manage => 1,
            Verb::Read => 2,
            Verb::Consume => 4,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Verb::Manage => "manage",
            Verb::Read => "read",
            Verb::Consume => "consume",
        }
    }
}

/// Queues a rule covers: a name, `prefix.*`, or `*` (every queue).
#[derive(Debug, Clone, PartialEq, Eq)]
enum QueuePattern {
    Exact(String),
    /// Everything that starts with this (ends with `.`, or is empty for `*`).
    Prefix(String),
}

impl QueuePattern {
    fn parse(s: &str) -> Result<QueuePattern, String> {
        if s == "*" {
            return Ok(QueuePattern::Prefix(String::new()));
        }
        let (name, prefix) = match s.strip_suffix(".*") {
            Some(p) => (p, true),
            None => (s, false),
        };
        let valid = !name.is_empty()
            && name.len() <= 128
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if !valid {
            return Err(format!(
                "queue pattern {s:?} is not a queue name, `prefix.*` or `*` (names use \
                 letters, digits, '.', '_' and '-')"
            ));
        }
        Ok(if prefix {
            QueuePattern::Prefix(format!("{name}."))
        } else {
            QueuePattern::Exact(name.to_string())
        })
    }

    fn matches(&self, queue: &str) -> bool {
        match self {
            QueuePattern::Exact(q) => q == queue,
            QueuePattern::Prefix(p) => queue.starts_with(p.as_str()),
        }
    }
}

#[derive(Debug)]
struct Rule {
    verbs: u8,
    queues: Vec<QueuePattern>,
}

/// A principal of the auth file.
#[derive(Debug)]
pub struct Principal {
    name: Arc<str>,
    rules: Vec<Rule>,
}

impl Principal {
    pub fn name(&self) -> &str {
        &self.name
    }

    fn may(&self, verb: Verb, queue: &str) -> bool {
        self.rules
            .iter()
            .any(|r| r.verbs & verb.bit() != 0 && r.queues.iter().any(|q| q.matches(queue)))
    }
}

/// The parsed auth file.
#[derive(Default)]
pub struct Policy {
    principals: Vec<Arc<Principal>>,
    /// (SHA-256 of the token, index into principals).
    tokens: Vec<([u8; 32], usize)>,
    /// (certificate subject CN, index into principals).
    subjects: Vec<(String, usize)>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDoc {
    principals: Vec<FilePrincipal>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FilePrincipal {
    name: String,
    #[serde(default)]
    token_sha256: Option<String>,
    #[serde(default)]
    mtls_subject: Option<String>,
    #[serde(default)]
    rules: Vec<FileRule>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRule {
    verbs: Vec<Verb>,
    queues: Vec<String>,
}

/// Why an auth file cannot be used; says where.
#[derive(Debug, thiserror::Error)]
#[error("--auth-file {path}: {message}")]
pub struct AuthFileError {
    path: String,
    message: String,
}

impl Policy {
    /// Parses an auth file's text; `path` is for messages.
    pub fn parse(text: &str, path: &Path) -> Result<Policy, AuthFileError> {
        let fail = |message: String| AuthFileError {
            path: path.display().to_string(),
            message,
        };
        let doc: FileDoc = serde_yaml_ng::from_str(text).map_err(|e| fail(e.to_string()))?;
        let mut policy = Policy::default();
        let mut names = HashSet::new();
        for (i, p) in doc.principals.into_iter().enumerate() {
            let at = format!("principals[{i}]");
            if p.name.trim().is_empty() {
                return Err(fail(format!("{at}: name is empty")));
            }
            if !names.insert(p.name.clone()) {
                return Err(fail(format!("{at}: name {:?} is used twice", p.name)));
            }
            let at = format!("principal {:?}", p.name);
            if p.token_sha256.is_none() && p.mtls_subject.is_none() {
                return Err(fail(format!(
                    "{at}: set token_sha256 (hex SHA-256 of its bearer token) or mtls_subject \
                     (its client certificate's subject CN)"
                )));
            }
            let index = policy.principals.len();
            if let Some(hex_hash) = &p.token_sha256 {
                let mut hash = [0u8; 32];
                hex::decode_to_slice(hex_hash.trim(), &mut hash).map_err(|_| {
                    fail(format!(
                        "{at}: token_sha256 must be 64 hex digits (the SHA-256 of the token, \
                         as `printf %s \"$TOKEN\" | sha256sum` prints it)"
                    ))
                })?;
                if policy.tokens.iter().any(|(h, _)| *h == hash) {
                    return Err(fail(format!(
                        "{at}: token_sha256 is also another principal's"
                    )));
                }
                policy.tokens.push((hash, index));
            }
            if let Some(subject) = &p.mtls_subject {
                if subject.is_empty() {
                    return Err(fail(format!("{at}: mtls_subject is empty")));
                }
                if policy.subjects.iter().any(|(s, _)| s == subject) {
                    return Err(fail(format!(
                        "{at}: mtls_subject {subject:?} is also another principal's"
                    )));
                }
                policy.subjects.push((subject.clone(), index));
            }
            let mut rules = Vec::with_capacity(p.rules.len());
            for (j, r) in p.rules.into_iter().enumerate() {
                if r.verbs.is_empty() || r.queues.is_empty() {
                    return Err(fail(format!(
                        "{at}: rules[{j}] needs at least one verb and one queue"
                    )));
                }
                let queues = r
                    .queues
                    .iter()
                    .map(|q| QueuePattern::parse(q))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| fail(format!("{at}: rules[{j}]: {e}")))?;
                rules.push(Rule {
                    verbs: r.verbs.iter().fold(0, |bits, v| bits | v.bit()),
                    queues,
                });
            }
            policy.principals.push(Arc::new(Principal {
                name: Arc::from(p.name.as_str()),
                rules,
            }));
        }
        Ok(policy)
    }

    /// Reads and parses an auth file.
    pub fn load(path: &Path) -> Result<Policy, AuthFileError> {
        let text = std::fs::read_to_string(path).map_err(|e| AuthFileError {
            path: path.display().to_string(),
            message: format!("cannot read it ({e})"),
        })?;
        Policy::parse(&text, path)
    }

    /// Whether some principal is known by its client certificate.
    pub fn names_certificates(&self) -> bool {
        !self.subjects.is_empty()
    }

    fn by_token(&self, token: &[u8]) -> Option<&Arc<Principal>> {
        let hash: [u8; 32] = Sha256::digest(token).into();
        // Every hash is compared, in constant time, whatever matched before.
        let mut found = None;
        for (h, index) in &self.tokens {
            if bool::from(h.ct_eq(&hash)) {
                found = Some(*index);
            }
        }
        found.and_then(|i| self.principals.get(i))
    }

    fn by_subject(&self, subject: &str) -> Option<&Arc<Principal>> {
        self.subjects
            .iter()
            .find(|(s, _)| s == subject)
            .and_then(|(_, i)| self.principals.get(*i))
    }
}

/// Names the principals; never the token hashes.
impl fmt::Debug for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Policy")
            .field(
                "principals",
                &self.principals.iter().map(|p| p.name()).collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// The access check of the Scheduler service.
#[derive(Debug, Clone, Default)]
pub struct Auth {
    /// None: no auth file, everything is open.
    policy: Option<Arc<Reloadable<Policy>>>,
}

/// Who is calling.
#[derive(Clone)]
pub enum Caller {
    /// No auth file: may do everything.
    Open,
    Principal(Arc<Principal>),
}

impl fmt::Debug for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Caller::Open => f.write_str("open"),
            Caller::Principal(p) => write!(f, "principal {}", p.name),
        }
    }
}

impl Auth {
    /// Without an auth file: everything is open.
    pub fn open() -> Auth {
        Auth { policy: None }
    }

    /// Loads the auth file (an error stops the start) and checks it again every `interval`.
    pub async fn start(path: PathBuf, interval: Duration) -> Result<Auth, AuthFileError> {
        let seen = fingerprint(std::slice::from_ref(&path)).await;
        let policy = Policy::load(&path)?;
        info!(
            file = %path.display(),
            principals = policy.principals.len(),
            "access control on: callers need a token or client certificate the auth file knows"
        );
        let policy = Arc::new(Reloadable::new(policy));
        let load_path = path.clone();
        spawn_reloader(
            "auth_file",
            vec![path],
            seen,
            interval,
            &policy,
            move || Policy::load(&load_path),
        );
        Ok(Auth {
            policy: Some(policy),
        })
    }

    /// Whether the auth file in force names a principal by its client certificate.
    pub fn names_certificates(&self) -> bool {
        self.policy
            .as_ref()
            .is_some_and(|p| p.get().names_certificates())
    }

    /// Whether an auth file is in force.
    pub fn enabled(&self) -> bool {
        self.policy.is_some()
    }

    /// Wakes its holder each time a changed auth file is put in force; None without one.
    pub fn changes(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        self.policy.as_ref().map(|p| p.changes())
    }

    /// Who sent a call with these metadata over a connection whose TLS peer is `peer`:
    /// its bearer token if it sent one, else its client certificate. UNAUTHENTICATED when
    /// neither is known.
    pub fn authenticate(
        &self,
        metadata: &MetadataMap,
        peer: Option<&TlsPeer>,
    ) -> Result<Caller, Status> {
        let Some(policy) = &self.policy else {
            return Ok(Caller::Open);
        };
        let policy = policy.get();
        if let Some(value) = metadata.get("authorization") {
            let token = value
                .to_str()
                .ok()
                .and_then(|v| {
                    let (scheme, token) = v.split_once(' ')?;
                    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
                })
                .filter(|t| !t.is_empty())
                .ok_or_else(|| {
                    refused("unauthenticated", "");
                    Status::unauthenticated("the authorization metadata must be `Bearer <token>`")
                })?;
            return match policy.by_token(token.as_bytes()) {
                Some(p) => Ok(Caller::Principal(p.clone())),
                None => {
                    refused("unauthenticated", "");
                    warn!(peer = ?peer.map(|p| p.remote_addr), "call refused: unknown bearer token");
                    Err(Status::unauthenticated(
                        "the bearer token is not one the auth file knows",
                    ))
                }
            };
        }
        if let Some(subject) = peer.and_then(|p| p.subject.as_deref()) {
            return match policy.by_subject(subject) {
                Some(p) => Ok(Caller::Principal(p.clone())),
                None => {
                    refused("unauthenticated", "");
                    warn!(
                        subject,
                        "call refused: client certificate not in the auth file"
                    );
                    Err(Status::unauthenticated(format!(
                        "the client certificate's subject CN {subject:?} is not a principal of \
                         the auth file"
                    )))
                }
            };
        }
        refused("unauthenticated", "");
        Err(Status::unauthenticated(
            "credentials required: send `authorization: Bearer <token>` metadata or a client \
             certificate",
        ))
    }
}

impl Caller {
    /// The principal's name, for spans and logs; None when open.
    pub fn name(&self) -> Option<&str> {
        match self {
            Caller::Open => None,
            Caller::Principal(p) => Some(&p.name),
        }
    }

    /// Whether the caller may `verb` on `queue`.
    pub fn may(&self, verb: Verb, queue: &str) -> bool {
        match self {
            Caller::Open => true,
            Caller::Principal(p) => p.may(verb, queue),
        }
    }

    /// PERMISSION_DENIED naming the queue unless the caller may `verb` on `queue`.
    pub fn check(&self, verb: Verb, queue: &str) -> Result<(), Status> {
        if self.may(verb, queue) {
            return Ok(());
        }
        let name = self.name().unwrap_or_default();
        refused("permission_denied", name);
        info!(
            principal = name,
            verb = verb.as_str(),
            queue,
            "call refused: not granted"
        );
        Err(Status::permission_denied(format!(
            "principal {name:?} may not {} queue {queue:?}; the auth file grants it no `{}` \
             rule covering that queue",
            verb.as_str(),
            verb.as_str()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(text: &str) -> Result<Policy, AuthFileError> {
        Policy::parse(text, Path::new("auth.yaml"))
    }

    fn token_hash(token: &str) -> String {
        hex::encode(Sha256::digest(token.as_bytes()))
    }

    fn caller(policy: Policy, token: &str) -> Result<Caller, Status> {
        let auth = Auth {
            policy: Some(Arc::new(Reloadable::new(policy))),
        };
        let mut md = MetadataMap::new();
        md.insert(
            "authorization",
            format!("Bearer {token}").parse().expect("ascii"),
        );
        auth.authenticate(&md, None)
    }

    #[test]
    fn patterns_match_exact_names_prefixes_and_everything() {
        let exact = QueuePattern::parse("billing").expect("valid");
        assert!(exact.matches("billing") && !exact.matches("billing.eu"));
        let prefix = QueuePattern::parse("billing.*").expect("valid");
        assert!(prefix.matches("billing.eu") && prefix.matches("billing.eu.late"));
        assert!(!prefix.matches("billing") && !prefix.matches("billingx.eu"));
        assert!(QueuePattern::parse("*").expect("valid").matches("payroll"));
        for bad in ["", ".*", "bill*", "a b", "billing.*.*x", "*.billing"] {
            assert!(QueuePattern::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn a_token_is_known_by_its_hash_and_grants_only_its_rules() {
        let text = format!(
            "principals:\n  - name: billing-api\n    token_sha256: {}\n    rules:\n      - {{verbs: [manage, read], queues: [\"billing.*\"]}}\n",
            token_hash("s3cret")
        );
        let c = caller(policy(&text).expect("valid"), "s3cret").expect("known");
        assert_eq!(c.name(), Some("billing-api"));
        assert!(c.may(Verb::Manage, "billing.eu") && c.may(Verb::Read, "billing.eu"));
        assert!(!c.may(Verb::Consume, "billing.eu"));
        assert!(!c.may(Verb::Manage, "payroll"));
        let denied = c.check(Verb::Manage, "payroll").expect_err("denied");
        assert_eq!(denied.code(), tonic::Code::PermissionDenied);
        assert!(
            denied.message().contains("\"payroll\""),
            "{}",
            denied.message()
        );

        let wrong = caller(policy(&text).expect("valid"), "guess").expect_err("unknown");
        assert_eq!(wrong.code(), tonic::Code::Unauthenticated);
        assert!(!wrong.message().contains("guess"));
    }

    #[test]
    fn missing_or_malformed_credentials_are_unauthenticated() {
        let auth = Auth {
            policy: Some(Arc::new(Reloadable::new(Policy::default()))),
        };
        let none = auth
            .authenticate(&MetadataMap::new(), None)
            .expect_err("no credentials");
        assert_eq!(none.code(), tonic::Code::Unauthenticated);
        let mut md = MetadataMap::new();
        md.insert("authorization", "Basic abc".parse().expect("ascii"));
        let basic = auth.authenticate(&md, None).expect_err("not bearer");
        assert_eq!(basic.code(), tonic::Code::Unauthenticated);
    }

    #[test]
    fn a_certificate_subject_names_its_principal() {
        let text = "principals:\n  - name: worker\n    mtls_subject: billing-worker\n    rules:\n      - {verbs: [consume], queues: [\"billing.*\"]}\n";
        let auth = Auth {
            policy: Some(Arc::new(Reloadable::new(policy(text).expect("valid")))),
        };
        let peer = |s: &str| TlsPeer {
            remote_addr: ([127, 0, 0, 1], 1).into(),
            subject: Some(Arc::from(s)),
        };
        let c = auth
            .authenticate(&MetadataMap::new(), Some(&peer("billing-worker")))
            .expect("known subject");
        assert!(c.may(Verb::Consume, "billing.x") && !c.may(Verb::Consume, "payroll"));
        let other = auth
            .authenticate(&MetadataMap::new(), Some(&peer("intruder")))
            .expect_err("unknown subject");
        assert_eq!(other.code(), tonic::Code::Unauthenticated);
    }

    #[test]
    fn bad_files_are_refused_saying_where() {
        let h = token_hash("t");
        for (text, says) in [
            ("principals: [{name: a}]", "token_sha256"),
            ("principals: [{name: a, token_sha256: abc}]", "64 hex"),
            (
                &format!(
                    "principals: [{{name: a, token_sha256: {h}}}, {{name: b, token_sha256: {h}}}]"
                ),
                "another principal",
            ),
            (
                "principals: [{name: a, mtls_subject: x}, {name: a, mtls_subject: y}]",
                "used twice",
            ),
            (
                "principals: [{name: a, mtls_subject: x, rules: [{verbs: [write], queues: [q]}]}]",
                "write",
            ),
            (
                "principals: [{name: a, mtls_subject: x, rules: [{verbs: [read], queues: [\"q*\"]}]}]",
                "queue pattern",
            ),
            (
                "principals: [{name: a, mtls_subject: x, rule: []}]",
                "unknown field",
            ),
            (
                "principals: [{name: a, mtls_subject: x, rules: [{verbs: [], queues: [q]}]}]",
                "at least one verb",
            ),
        ] {
            let err = policy(text).expect_err(text).to_string();
            assert!(
                err.contains(says) && err.contains("auth.yaml"),
                "{text}: {err}"
            );
        }
    }
}
