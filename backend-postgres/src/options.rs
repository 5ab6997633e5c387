//! Connection options: URL, schema, pool settings and clock.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration as StdDuration;

use relayq_core::{Clock, Error, Result};
use sqlx::postgres::PgConnectOptions;

/// The schema relayq's tables live in when none is configured.
pub const DEFAULT_SCHEMA: &str = "relayq";

/// The `application_name` relayq's connections report when none is configured.
pub const DEFAULT_APPLICATION_NAME: &str = "relayq";

/// The pool size when none is configured.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 10;

/// How long a queue operation waits for the server to answer when no
/// [`PgOptions::reply_timeout`] is configured: far longer than those
/// statements take on a live server that no lock holds up, far shorter
/// than TCP's own timeout on a dead one.
pub const DEFAULT_REPLY_TIMEOUT: StdDuration = StdDuration::from_secs(60);

/// The longest [`PgOptions::reply_timeout`] and
/// [`PgOptions::acquire_timeout`] accepted.
const MAX_TIMEOUT: StdDuration = StdDuration::from_secs(24 * 60 * 60);

/// The longest [`PgOptions::idle_timeout`] and [`PgOptions::max_lifetime`]
/// accepted: the pool adds them to the current instant, which a huge one
/// overflows (a panic in the pool's own task).
const MAX_POOL_LIFETIME: StdDuration = StdDuration::from_secs(100 * 365 * 24 * 60 * 60);

/// The query parameters of a URL that sqlx reads (besides `options[…]`);
/// it ignores any other, so relayq refuses them rather than connect
/// without a setting its user asked for (`connect_timeout`,
/// `target_session_attrs`, a `schema`…).
const URL_PARAMETERS: [&str; 18] = [
    "sslmode",
    "ssl-mode",
    "sslrootcert",
    "ssl-root-cert",
    "ssl-ca",
    "sslcert",
    "ssl-cert",
    "sslkey",
    "ssl-key",
    "statement-cache-capacity",
    "host",
    "hostaddr",
    "port",
    "dbname",
    "user",
    "password",
    "application_name",
    "options",
];

/// Rows changed (claimed, acknowledged, extended, deleted…) through one
/// backend between the VACUUMs it runs, when none is configured: about
/// 12,000 jobs' worth.
pub const DEFAULT_VACUUM_THRESHOLD: u64 = 25_000;

/// The longest `application_name` accepted. PostgreSQL keeps 63 bytes; the
/// listener connection appends [`LISTENER_SUFFIX`], which must still fit.
const MAX_APPLICATION_NAME_LEN: usize = 63 - LISTENER_SUFFIX.len();

/// Appended to the `application_name` of the one LISTEN connection, so it
/// can be told apart from pool connections in `pg_stat_activity`.
pub const LISTENER_SUFFIX: &str = "-listener";

/// How to reach PostgreSQL and how to use it: the URL, the schema relayq's
/// tables live in, pool settings and the clock.
///
/// Nothing is checked until [`PgBackend::connect_with`](crate::PgBackend::connect_with);
/// then a bad URL, schema name or pool setting is an
/// [`Error::Config`](relayq_core::Error::Config) saying which.
///
/// ```
/// use relayq_postgres::PgOptions;
/// use std::time::Duration;
///
/// let options = PgOptions::new("postgres://app:secret@db.internal/jobs")
///     .schema("queue")
///     .max_connections(20)
///     .acquire_timeout(Duration::from_secs(5));
/// // Debug output never shows the password.
/// assert!(!format!("{options:?}").contains("secret"));
/// ```
#[derive(Clone)]
pub struct PgOptions {
    pub(crate) url: String,
    pub(crate) schema: String,
    pub(crate) max_connections: u32,
    pub(crate) min_connections: u32,
    pub(crate) acquire_timeout: StdDuration,
    pub(crate) reply_timeout: Option<StdDuration>,
    pub(crate) idle_timeout: Option<StdDuration>,
    pub(crate) max_lifetime: Option<StdDuration>,
    pub(crate) application_name: Option<String>,
    pub(crate) clock: Option<Arc<dyn Clock>>,
    pub(crate) migrate: bool,
    pub(crate) vacuum_threshold: Option<u64>,
}

impl fmt::Debug for PgOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgOptions")
            .field("url", &redact_url(&self.url))
            .field("schema", &self.schema)
            .field("max_connections", &self.max_connections)
            .field("min_connections", &self.min_connections)
            .field("acquire_timeout", &self.acquire_timeout)
            .field("reply_timeout", &self.reply_timeout)
            .field("idle_timeout", &self.idle_timeout)
            .field("max_lifetime", &self.max_lifetime)
            .field("application_name", &self.application_name)
            .field("clock", &self.clock)
            .field("migrate", &self.migrate)
            .field("vacuum_threshold", &self.vacuum_threshold)
            .finish()
    }
}

impl PgOptions {
    /// Options for the database at `url` (`postgres://user:password@host:port/db?…`),
    /// with the defaults: schema [`DEFAULT_SCHEMA`], at most
    /// [`DEFAULT_MAX_CONNECTIONS`] pooled connections (plus one for LISTEN),
    /// a 30 s acquire timeout, a [`DEFAULT_REPLY_TIMEOUT`] reply timeout, idle connections closed after 10 minutes,
    /// connections recycled after 30 minutes, the server's clock, and
    /// migrations applied on connect.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            schema: DEFAULT_SCHEMA.to_owned(),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            min_connections: 0,
            acquire_timeout: StdDuration::from_secs(30),
            reply_timeout: Some(DEFAULT_REPLY_TIMEOUT),
            idle_timeout: Some(StdDuration::from_secs(600)),
            max_lifetime: Some(StdDuration::from_secs(1800)),
            application_name: None,
            clock: None,
            migrate: true,
            vacuum_threshold: Some(DEFAULT_VACUUM_THRESHOLD),
        }
    }

    /// The PostgreSQL schema holding relayq's tables. It must match
    /// `^[a-z_][a-z0-9_]{0,62}$` and not start with `pg_`.
    pub fn schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = schema.into();
        self
    }

    /// The most pooled connections (at least 1). The backend never holds
    /// more than this plus one dedicated LISTEN connection.
    pub fn max_connections(mut self, n: u32) -> Self {
        self.max_connections = n;
        self
    }

    /// Connections the pool keeps open even when idle (at most
    /// `max_connections`).
    pub fn min_connections(mut self, n: u32) -> Self {
        self.min_connections = n;
        self
    }

    /// How long an operation waits for a free pooled connection (and for the
    /// first connection at startup) before failing; also how long one
    /// attempt to (re)connect the LISTEN connection, or to LISTEN on a
    /// subscription's channels, may take before it fails and the listener
    /// backs off and tries again. Positive and at most a day.
    pub fn acquire_timeout(mut self, timeout: StdDuration) -> Self {
        self.acquire_timeout = timeout;
        self
    }

    /// How long a queue operation (a push, a claim, an acknowledgement, a
    /// lease extension or release, [`Observer::get`](relayq_core::Observer::get))
    /// waits for the server to answer its statements, one budget for all
    /// of them. Once it passes, the operation fails with
    /// [`Error::Backend`](relayq_core::Error::Backend) (an `io::Error` of
    /// kind `TimedOut` down its source chain) and its connection is closed:
    /// a server that vanished without a reset, as in a failover or a cut
    /// link, answers nothing, and TCP gives up only after about a quarter
    /// of an hour. What was sent may or may not have taken effect, as with
    /// any connection lost mid-statement. The notifications of pool pushes
    /// are bounded the same way, and sent again. Default
    /// [`DEFAULT_REPLY_TIMEOUT`]. `None` waits as long as the network does.
    ///
    /// A statement blocked on the server for longer (behind a lock, say),
    /// or a batch large enough to take longer, fails too; on PostgreSQL 14
    /// and later on Linux the server then abandons it within a second. At
    /// most a day. Each chunk of a [`Cleaner::clean`](relayq_core::Cleaner::clean)
    /// is bounded too. Other [`Observer`](relayq_core::Observer) calls,
    /// `VACUUM`, migrations and
    /// [`PgBackend::push_in`](crate::PgBackend::push_in) on the caller's
    /// connection are not bounded: some may scan a large table for longer.
    /// The LISTEN connection is bounded by
    /// [`acquire_timeout`](Self::acquire_timeout).
    ///
    /// A pooled connection idle for a second or more is pinged before use,
    /// for at most half the acquire timeout (and no longer than this
    /// timeout); one whose server went silent is then closed and replaced.
    /// Over TLS (feature `tls-rustls`) sqlx's close of it waits to hear
    /// from the silent server, so that call fails at the acquire timeout
    /// instead of moving on to a new connection.
    pub fn reply_timeout(mut self, timeout: Option<StdDuration>) -> Self {
        self.reply_timeout = timeout;
        self
    }

    /// Idle pooled connections above `min_connections` are closed after
    /// this long; `None` keeps them.
    pub fn idle_timeout(mut self, timeout: Option<StdDuration>) -> Self {
        self.idle_timeout = timeout;
        self
    }

    /// Pooled connections are replaced after this long; `None` keeps them.
    pub fn max_lifetime(mut self, lifetime: Option<StdDuration>) -> Self {
        self.max_lifetime = lifetime;
        self
    }

    /// The `application_name` the pooled connections report to the server
    /// (the LISTEN connection appends [`LISTENER_SUFFIX`]). Printable ASCII,
    /// at most 54 bytes. By default the URL's `application_name` (or
    /// `PGAPPNAME`'s), else [`DEFAULT_APPLICATION_NAME`].
    pub fn application_name(mut self, name: impl Into<String>) -> Self {
        self.application_name = Some(name.into());
        self
    }

    /// Reads `now` from `clock` instead of the server (e.g. a
    /// [`ManualClock`](relayq_core::ManualClock) in tests). Every statement
    /// then binds `now` as a parameter.
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = Some(clock);
        self
    }

    /// Whether [`PgBackend::connect_with`](crate::PgBackend::connect_with)
    /// applies pending migrations (the default) or leaves the schema alone,
    /// for deployments that run [`PgBackend::migrate`](crate::PgBackend::migrate)
    /// as a separate step. With it off, connecting does not look at the
    /// schema at all, its version included: a process started so against
    /// a schema not yet migrated fails at its first statement; compare
    /// [`PgBackend::schema_version`](crate::PgBackend::schema_version)
    /// with [`SCHEMA_VERSION`](crate::SCHEMA_VERSION) where that matters.
    pub fn migrate(mut self, yes: bool) -> Self {
        self.migrate = yes;
        self
    }

    /// After this many rows changed through this backend (each claim,
    /// acknowledgement, lease extension or deletion changes one), it runs
    /// `VACUUM (SKIP_LOCKED)` on the jobs table in the background, resting
    /// nine times as long as that VACUUM took before the next. Dead entries
    /// left by claims pile up at the head of the claim index, where every
    /// claim starts reading, and autovacuum visits a table at most once a
    /// minute (and not at all where it is off); without this, claims slow
    /// down as the queue churns. `None` leaves vacuuming to autovacuum.
    /// Default [`DEFAULT_VACUUM_THRESHOLD`]; at least 1. VACUUM needs the
    /// table's owner (the role that ran the migrations); another role's
    /// attempts are skipped by the server with a warning.
    pub fn vacuum_threshold(mut self, rows: Option<u64>) -> Self {
        self.vacuum_threshold = rows;
        self
    }

    /// The URL with any password replaced by `***`, fit for logs.
    pub fn redacted_url(&self) -> String {
        redact_url(&self.url)
    }

    /// Checks every setting and parses the URL; returns the connection
    /// options and the `application_name` the pool's connections report.
    pub(crate) fn validate(&self) -> Result<(PgConnectOptions, String)> {
        check_schema(&self.schema)?;
        if self.max_connections == 0 {
            return Err(Error::config("max_connections", "must be at least 1"));
        }
        if self.min_connections > self.max_connections {
            return Err(Error::config(
                "min_connections",
                format!(
                    "{} exceeds max_connections ({})",
                    self.min_connections, self.max_connections
                ),
            ));
        }
        // The pool adds it to the current instant, which a huge one overflows.
        if self.acquire_timeout.is_zero() || self.acquire_timeout > MAX_TIMEOUT {
            return Err(Error::config(
                "acquire_timeout",
                "must be positive and at most a day",
            ));
        }
        if self
            .reply_timeout
            .is_some_and(|t| t.is_zero() || t > MAX_TIMEOUT)
        {
            return Err(Error::config(
                "reply_timeout",
                "must be positive and at most a day (None waits as long as the network does)",
            ));
        }
        // Zero made the pool's upkeep task spin without sleeping, closing
        // every connection as it went idle; a huge one overflowed the
        // instant that task computes, a panic in it.
        for (setting, limit) in [
            ("idle_timeout", self.idle_timeout),
            ("max_lifetime", self.max_lifetime),
        ] {
            if limit.is_some_and(|t| t.is_zero() || t > MAX_POOL_LIFETIME) {
                return Err(Error::config(
                    setting,
                    "must be positive and at most 100 years (None keeps connections)",
                ));
            }
        }
        if self.vacuum_threshold == Some(0) {
            return Err(Error::config(
                "vacuum_threshold",
                "must be at least 1 (None turns vacuuming off)",
            ));
        }
        let connect = parse_url(&self.url)?;
        let name = match (&self.application_name, connect.get_application_name()) {
            (Some(name), _) => {
                if name.is_empty()
                    || name.len() > MAX_APPLICATION_NAME_LEN
                    || !name.bytes().all(|b| b.is_ascii_graphic() || b == b' ')
                {
                    return Err(Error::config(
                        "application_name",
                        format!(
                            "must be 1 to {MAX_APPLICATION_NAME_LEN} printable ASCII characters, got {name:?}"
                        ),
                    ));
                }
                name.clone()
            }
            // The URL's (or PGAPPNAME's) is taken as PostgreSQL would take
            // it, not refused: other characters become `?`, and it is cut
            // to leave room for the LISTEN connection's suffix.
            (None, Some(name)) if !name.is_empty() => name
                .chars()
                .map(|c| {
                    if c.is_ascii_graphic() || c == ' ' {
                        c
                    } else {
                        '?'
                    }
                })
                .take(MAX_APPLICATION_NAME_LEN)
                .collect(),
            (None, _) => DEFAULT_APPLICATION_NAME.to_owned(),
        };
        Ok((connect, name))
    }
}

/// Checks a schema name: `^[a-z_][a-z0-9_]{0,62}$`, not `pg_…` (reserved
/// by PostgreSQL). Such a name never needs quoting, but is quoted anyway.
pub(crate) fn check_schema(schema: &str) -> Result<()> {
    let bytes = schema.as_bytes();
    let valid = !bytes.is_empty()
        && bytes.len() <= 63
        && (bytes[0].is_ascii_lowercase() || bytes[0] == b'_')
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'_');
    if !valid {
        return Err(Error::config(
            "schema",
            format!("{schema:?} must match ^[a-z_][a-z0-9_]{{0,62}}$"),
        ));
    }
    if schema.starts_with("pg_") {
        return Err(Error::config(
            "schema",
            format!("{schema:?} is reserved: names starting with pg_ belong to PostgreSQL"),
        ));
    }
    Ok(())
}

/// Parses a `postgres://` or `postgresql://` URL. The error names what is
/// wrong with the URL, which it shows with the password replaced.
fn parse_url(url: &str) -> Result<PgConnectOptions> {
    let redacted = redact_url(url);
    // Schemes are case-insensitive (RFC 3986); sqlx is told in lower case.
    let url = match url.split_once("://") {
        Some((scheme, rest))
            if crate::URL_SCHEMES.contains(&scheme.to_ascii_lowercase().as_str()) =>
        {
            format!("{}://{rest}", scheme.to_ascii_lowercase())
        }
        _ => {
            return Err(Error::config(
                "url",
                format!(
                    "{redacted:?} is not a PostgreSQL URL: it must start with postgres:// or postgresql://"
                ),
            ));
        }
    };
    let url = url.as_str();
    check_url_parameters(url)
        .map_err(|reason| Error::config("url", format!("{redacted:?}: {reason}")))?;
    PgConnectOptions::from_str(url).map_err(|e| {
        let mut reason = e.to_string();
        if let Some(password) = password_of(url) {
            reason = reason.replace(password, "***");
        }
        Error::config("url", format!("{redacted:?}: {reason}"))
    })
}

/// Why sqlx would read `url` otherwise than its user meant, if it would: a
/// query parameter it ignores, or a list of hosts (libpq's failover,
/// which sqlx would look up as one host name, and fail again and again).
fn check_url_parameters(url: &str) -> std::result::Result<(), String> {
    // A URL `url` cannot parse is left to sqlx, which says why.
    let Ok(parsed) = url::Url::parse(url) else {
        return Ok(());
    };
    let list = |hosts: &str| {
        format!(
            "lists several hosts ({hosts:?}); relayq connects to one: name the \
             primary, or a proxy or DNS name that follows it"
        )
    };
    if let Some(host) = parsed.host_str().filter(|host| host.contains(',')) {
        return Err(list(host));
    }
    for (key, value) in parsed.query_pairs() {
        if key == "host" && value.contains(',') {
            return Err(list(&value));
        }
        let options = key.starts_with("options[") && key.ends_with(']');
        if !options && !URL_PARAMETERS.contains(&&*key) {
            let hint = if key == "schema" || key == "search_path" {
                " (relayq's schema is set with PgOptions::schema)"
            } else {
                ""
            };
            return Err(format!(
                "unknown parameter {key:?}{hint}; the URL may set {}, and options[…]",
                URL_PARAMETERS.join(", ")
            ));
        }
    }
    Ok(())
}

/// The password in a URL's user info, if any.
fn password_of(url: &str) -> Option<&str> {
    let (_, rest) = url.split_once("://")?;
    let authority = rest.split(['/', '?', '#']).next()?;
    let (userinfo, _) = authority.rsplit_once('@')?;
    let (_, password) = userinfo.split_once(':')?;
    (!password.is_empty()).then_some(password)
}

/// The URL with the password of its user info, and any `password=` query
/// parameter, replaced by `***`.
pub(crate) fn redact_url(url: &str) -> String {
    let mut out = match url.split_once("://") {
        Some((scheme, rest)) => {
            let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
            let (authority, tail) = rest.split_at(end);
            let authority = match authority.rsplit_once('@') {
                Some((userinfo, host)) => match userinfo.split_once(':') {
                    Some((user, _)) => format!("{user}:***@{host}"),
                    None => format!("{userinfo}@{host}"),
                },
                None => authority.to_owned(),
            };
            format!("{scheme}://{authority}{tail}")
        }
        // Not a URL at all: echoing it could echo a secret.
        None => return "<not a URL>".to_owned(),
    };
    if let Some(q) = out.find('?') {
        let (base, query) = out.split_at(q + 1);
        let query = query
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
                _ => pair.to_owned(),
            })
            .collect::<Vec<_>>()
            .join("&");
        out = format!("{base}{query}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_names() {
        for ok in ["relayq", "_x", "a1_b2", &"a".repeat(63)] {
            assert!(check_schema(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "1abc",
            "Relayq",
            "a-b",
            "a b",
            "a\"b",
            "pg_catalog",
            "x;drop",
            &"a".repeat(64),
            "é",
        ] {
            assert!(
                matches!(check_schema(bad), Err(Error::Config { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn redaction() {
        assert_eq!(
            redact_url("postgres://u:s3cret@h:5432/db?sslmode=disable"),
            "postgres://u:***@h:5432/db?sslmode=disable"
        );
        assert_eq!(redact_url("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(
            redact_url("postgres://h/db?user=u&password=s3cret"),
            "postgres://h/db?user=u&password=***"
        );
        assert_eq!(
            redact_url("postgres://u:p@ss@h/db"),
            "postgres://u:***@h/db"
        );
        assert_eq!(password_of("postgres://u:p@ss@h/db"), Some("p@ss"));
    }

    #[test]
    fn bad_urls_are_config_errors_without_the_password() {
        for url in [
            "mysql://u:s3cret@h/db",
            "s3cret",
            "postgres://u:s3cret@h:notaport/db",
            "postgres://u:s3cret@h/db?sslmode=bogus",
        ] {
            let err = PgOptions::new(url).validate().unwrap_err();
            let text = format!("{err} {err:?}");
            assert!(matches!(err, Error::Config { .. }), "{url}: {text}");
            assert!(!text.contains("s3cret"), "{url}: {text}");
        }
    }

    #[test]
    fn pool_lifetimes_are_positive_and_bounded() {
        let day = StdDuration::from_secs(24 * 60 * 60);
        for (setting, options) in [
            (
                "idle_timeout",
                PgOptions::new("postgres://h/db").idle_timeout(Some(StdDuration::ZERO)),
            ),
            (
                "idle_timeout",
                PgOptions::new("postgres://h/db")
                    .idle_timeout(Some(StdDuration::MAX))
                    .max_lifetime(None),
            ),
            (
                "max_lifetime",
                PgOptions::new("postgres://h/db").max_lifetime(Some(StdDuration::ZERO)),
            ),
            (
                "max_lifetime",
                PgOptions::new("postgres://h/db").max_lifetime(Some(StdDuration::MAX)),
            ),
        ] {
            let err = options.validate().unwrap_err();
            assert_eq!(err.config_setting(), Some(setting), "{err}");
        }
        PgOptions::new("postgres://h/db")
            .idle_timeout(None)
            .max_lifetime(Some(day * 7))
            .validate()
            .expect("None and a week are fine");
    }

    /// A URL parameter sqlx would ignore, or a list of hosts sqlx would
    /// look up as one name, is refused; the parameters sqlx reads pass.
    #[test]
    fn urls_that_would_connect_otherwise_than_meant_are_refused() {
        for url in [
            "postgres://h/db?schema=jobs",
            "postgres://h/db?search_path=jobs",
            "postgres://h/db?connect_timeout=5",
            "postgres://h/db?sslmode=disable&target_session_attrs=read-write",
            "postgres://db1,db2/app",
            "postgres://db1:5432,db2:5432/app",
            "postgres:///app?host=db1,db2",
        ] {
            let err = PgOptions::new(url).validate().unwrap_err();
            assert_eq!(err.config_setting(), Some("url"), "{url}: {err}");
        }
        for url in [
            "postgres://u:p@h:5433/db?sslmode=disable&application_name=x&statement-cache-capacity=10",
            "postgres:///db?host=/var/run/postgresql&user=u&dbname=d&port=5433",
            "postgres://h/db?options=-c%20statement_timeout%3D5s&options[lock_timeout]=1s",
        ] {
            PgOptions::new(url).validate().expect(url);
        }
    }

    /// The pool's connections report the `application_name` set on the
    /// options, else the URL's, else relayq's own.
    #[test]
    fn the_application_name_comes_from_the_options_or_the_url() {
        let name = |options: PgOptions| options.validate().expect("valid").1;
        let url = "postgres://h/db?application_name=billing";
        assert_eq!(name(PgOptions::new(url)), "billing");
        assert_eq!(name(PgOptions::new(url).application_name("mine")), "mine");
        if std::env::var_os("PGAPPNAME").is_none() {
            assert_eq!(
                name(PgOptions::new("postgres://h/db")),
                DEFAULT_APPLICATION_NAME
            );
        }
        // The URL's is taken as the server would take it, not refused.
        let long = format!("postgres://h/db?application_name={}", "x".repeat(60));
        assert_eq!(
            name(PgOptions::new(long)),
            "x".repeat(MAX_APPLICATION_NAME_LEN)
        );
        assert_eq!(
            name(PgOptions::new("postgres://h/db?application_name=caf%C3%A9")),
            "caf?"
        );
        if std::env::var_os("PGAPPNAME").is_none() {
            assert_eq!(
                name(PgOptions::new("postgres://h/db?application_name=")),
                DEFAULT_APPLICATION_NAME
            );
        }
        let err = PgOptions::new(url)
            .application_name("x".repeat(60))
            .validate()
            .unwrap_err();
        assert_eq!(err.config_setting(), Some("application_name"), "{err}");
    }

    #[test]
    fn schemes_are_case_insensitive() {
        for url in ["PostgreSQL://u@h:5433/db", "POSTGRES://u@h:5433/db"] {
            let options = parse_url(url).expect(url);
            assert_eq!(
                (
                    options.get_host(),
                    options.get_port(),
                    options.get_database()
                ),
                ("h", 5433, Some("db")),
                "{url}"
            );
        }
    }
}
