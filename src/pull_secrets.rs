//! Registry credentials from imagePullSecrets, as the kubelet reads and matches them. Pure:
//! the cluster adapter reads the Secrets, this parses them and picks the credential an image
//! is pulled with.
//!
//! - **Parsing**: `kubernetes.io/dockerconfigjson` Secrets (`.dockerconfigjson`:
//!   `{"auths": {"<key>": {"username", "password"} | {"auth": base64("user:pass")}}}`) and the
//!   legacy `kubernetes.io/dockercfg` (`.dockercfg`: the `auths` map alone). Credential helpers
//!   and stores (`credsStore`, `credHelpers`) are never run, and identity tokens are ignored.
//! - **Matching** (kubelet `pkg/credentialprovider/keyring.go`, `BasicDockerKeyring.Add`,
//!   `Lookup`, `URLsMatch`): a key is a URL without its scheme and without a leading `/v1/` or
//!   `/v2/`, `host[:port][/path]`; it matches an image when the ports are equal, the host has
//!   as many dot-separated parts as the image's registry and each part matches as a glob
//!   (`*.azurecr.io`), and the key's path is a string prefix of the image's. Keys are tried
//!   in reverse sorted order (longer before shorter with the same prefix, names before
//!   globs); Docker Hub's key (`https://index.docker.io/v1/`) is the fallback for `docker.io`
//!   images that no key matched.
//!
//! Only the first matching credential is tried (the kubelet tries each in turn, then an
//! anonymous pull).

use std::collections::BTreeMap;

use base64::Engine as _;
use serde::Deserialize;

/// A username and password for the registries a key names.
#[derive(Clone, PartialEq, Eq)]
pub struct RegistryCredential {
    /// The key as written in the docker config (`contoso.azurecr.io`, `https://index.docker.io/v1/`).
    pub key: String,
    /// The user name.
    pub username: String,
    /// The password or token.
    pub password: String,
}

impl std::fmt::Debug for RegistryCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryCredential")
            .field("key", &self.key)
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

impl RegistryCredential {
    /// An identifier of the credential that does not reveal it (the SHA-256 of key, user and
    /// password), for cache keys.
    pub fn identity(&self) -> String {
        crate::signature::sha256(
            format!("{}\n{}\n{}", self.key, self.username, self.password).as_bytes(),
        )
    }
}

#[derive(Deserialize)]
struct DockerConfig {
    #[serde(default)]
    auths: BTreeMap<String, Entry>,
}

#[derive(Deserialize)]
struct Entry {
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    auth: Option<String>,
}

/// Largest docker config read from a Secret, in bytes: real ones hold a few credentials in
/// well under a KiB each, and a tenant's Secret may be 1 MiB.
pub const CONFIG_MAX_BYTES: usize = 64 * 1024;
/// Most credentials one docker config may hold.
pub const CREDENTIALS_MAX: usize = 64;

/// The credentials of a Secret's data: `.dockerconfigjson` (with `auths`) or `.dockercfg` (the
/// map alone). Entries without a user name and password are left out.
///
/// # Errors
/// Why the data is not a docker config, or is over [`CONFIG_MAX_BYTES`] or
/// [`CREDENTIALS_MAX`] entries.
pub fn parse(data: &[u8], legacy: bool) -> Result<Vec<RegistryCredential>, String> {
    if data.len() > CONFIG_MAX_BYTES {
        return Err(format!(
            "{} bytes, over the {} KiB arcguard reads",
            data.len(),
            CONFIG_MAX_BYTES / 1024
        ));
    }
    let auths = if legacy {
        serde_json::from_slice::<BTreeMap<String, Entry>>(data)
    } else {
        serde_json::from_slice::<DockerConfig>(data).map(|config| config.auths)
    }
    .map_err(|e| format!("not a docker config: {e}"))?;
    if auths.len() > CREDENTIALS_MAX {
        return Err(format!(
            "a docker config of {} credentials, over the {CREDENTIALS_MAX} arcguard reads",
            auths.len()
        ));
    }
    let mut credentials = Vec::new();
    for (key, entry) in auths {
        let (username, password) = match (entry.username, entry.password, entry.auth) {
            (Some(user), Some(password), _) if !user.is_empty() => (user, password),
            (_, _, Some(auth)) => {
                let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(auth.trim())
                else {
                    continue;
                };
                let Ok(text) = String::from_utf8(decoded) else { continue };
                let Some((user, password)) = text.split_once(':') else { continue };
                (user.to_owned(), password.to_owned())
            }
            _ => continue,
        };
        credentials.push(RegistryCredential { key, username, password });
    }
    Ok(credentials)
}

/// A key or image as the kubelet compares them (`ParseSchemelessURL`, `splitURL`): host parts,
/// port and path (from its `/`).
struct Parsed<'a> {
    host: Vec<&'a str>,
    port: Option<&'a str>,
    path: &'a str,
}

fn split(url: &str) -> Option<Parsed<'_>> {
    let url = url.strip_prefix("https://").or_else(|| url.strip_prefix("http://")).unwrap_or(url);
    let (authority, path) = match url.find('/') {
        Some(at) => url.split_at(at),
        None => (url, ""),
    };
    if authority.is_empty() {
        return None;
    }
    let (host, port) = match authority.rsplit_once(':') {
        Some((host, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => {
            (host, Some(port))
        }
        _ => (authority, None),
    };
    Some(Parsed { host: host.split('.').collect(), port, path })
}

/// A docker config key as the kubelet's keyring indexes it (`BasicDockerKeyring.Add`): without
/// its scheme, and without a leading `/v1/` or `/v2/` (the Docker registry API's versions,
/// which docker treats as the host itself); a path of just `/` is dropped.
fn normalised_key(key: &str) -> String {
    let key = key.strip_prefix("https://").or_else(|| key.strip_prefix("http://")).unwrap_or(key);
    let (authority, path) = match key.find('/') {
        Some(at) => key.split_at(at),
        None => (key, ""),
    };
    let path = if path.starts_with("/v1/") || path.starts_with("/v2/") { &path[3..] } else { path };
    if path.is_empty() || path == "/" { authority.to_owned() } else { format!("{authority}{path}") }
}

/// Docker Hub's key in the kubelet's keyring (`defaultRegistryHost`), used for Docker Hub
/// images when no key matched them.
const DOCKER_HUB_KEY: &str = "index.docker.io";

/// Whether `pattern` (a host part, `*` matching any run of characters) matches `part`.
/// Whether `part` matches `pattern`, whose `*` stands for any run of characters, in any ASCII
/// case. Greedy with one backtrack point, so `pattern.len() * part.len()` steps at worst: a key
/// of many `*` from a tenant's Secret can neither recurse the stack away nor take exponential
/// time (a recursive match did both).
fn glob(pattern: &str, part: &str) -> bool {
    let (pattern, part) = (pattern.as_bytes(), part.as_bytes());
    let (mut p, mut s) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while s < part.len() {
        if pattern.get(p) == Some(&b'*') {
            star = Some((p, s));
            p += 1;
        } else if pattern.get(p).is_some_and(|c| c.eq_ignore_ascii_case(&part[s])) {
            p += 1;
            s += 1;
        } else if let Some((star_at, from)) = star {
            // The last `*` takes one more character; the rest of the pattern starts again.
            p = star_at + 1;
            s = from + 1;
            star = Some((star_at, from + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

/// Whether `key` matches `image` (kubelet `URLsMatch`): equal ports, as many host parts, each
/// matching as a glob, and the key's path a prefix of the image's (a string prefix, as there:
/// `reg.io/team` matches `reg.io/teamx/app`).
fn matches(key: &Parsed<'_>, image: &Parsed<'_>) -> bool {
    key.port == image.port
        && key.host.len() == image.host.len()
        && image.path.starts_with(key.path)
        && key.host.iter().zip(&image.host).all(|(pattern, part)| glob(pattern, part))
}

/// The credential the kubelet pulls `registry/repository` with first (`BasicDockerKeyring.Lookup`):
/// of the keys sorted in reverse order (longer before shorter with the same prefix, names
/// before globs), the first that matches; else, for a Docker Hub image, Docker Hub's key; else
/// `None`, an anonymous pull.
pub fn for_image<'a>(
    registry: &str,
    repository: &str,
    credentials: &'a [RegistryCredential],
) -> Option<&'a RegistryCredential> {
    if credentials.is_empty() {
        return None;
    }
    let image = format!("{registry}/{repository}");
    let image = split(&image)?;
    let mut keys: Vec<(String, &RegistryCredential)> = credentials
        .iter()
        .map(|credential| (normalised_key(&credential.key), credential))
        .collect();
    // Stable: a key given twice keeps the order its Secrets were given in.
    keys.sort_by(|a, b| b.0.cmp(&a.0));
    keys.iter()
        .find(|(key, _)| split(key).is_some_and(|key| matches(&key, &image)))
        .or_else(|| {
            (registry == "docker.io").then(|| keys.iter().find(|(key, _)| key == DOCKER_HUB_KEY))?
        })
        .map(|(_, credential)| *credential)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn globs_match_as_the_kubelet_does_in_bounded_time() {
        for (pattern, part, expected) in [
            ("*", "contoso", true),
            ("", "", true),
            ("", "a", false),
            ("con*so", "contoso", true),
            ("CON*", "contoso", true),
            ("*so", "contoso", true),
            ("*x*", "contoso", false),
            ("c*t*o", "contoso", true),
            ("c*t*x", "contoso", false),
            ("**", "", true),
            ("a*", "", false),
        ] {
            assert_eq!(glob(pattern, part), expected, "{pattern} ~ {part}");
        }
        // A Secret's key of 200,000 `*`: once a stack overflow, then exponential; now a scan.
        let stars = "*".repeat(200_000);
        assert!(glob(&format!("{stars}z"), "xyz"));
        assert!(!glob(&format!("{stars}q"), "contoso-registry-with-a-long-name"));
    }

    fn credential(key: &str) -> RegistryCredential {
        RegistryCredential { key: key.into(), username: "u".into(), password: key.into() }
    }

    #[test]
    fn parses_both_secret_types_and_skips_what_holds_no_password() {
        let auth = base64::engine::general_purpose::STANDARD.encode("bob:s3cret:with:colons");
        let config = json!({"auths": {
            "contoso.azurecr.io": {"username": "alice", "password": "pw"},
            "https://index.docker.io/v1/": {"auth": auth},
            "token-only.io": {"identitytoken": "x"},
            "bad.io": {"auth": "%%%"},
        }, "credsStore": "desktop"});
        let parsed = parse(&serde_json::to_vec(&config).expect("json"), false).expect("parses");
        let found: Vec<(&str, &str, &str)> = parsed
            .iter()
            .map(|c| (c.key.as_str(), c.username.as_str(), c.password.as_str()))
            .collect();
        assert_eq!(
            found,
            vec![
                ("contoso.azurecr.io", "alice", "pw"),
                ("https://index.docker.io/v1/", "bob", "s3cret:with:colons"),
            ]
        );
        let legacy = json!({"reg.io:5000": {"username": "a", "password": "b"}});
        assert_eq!(
            parse(&serde_json::to_vec(&legacy).expect("json"), true).map(|c| c.len()),
            Ok(1)
        );
        assert!(parse(b"\"not a config\"", false).is_err());
        // Bounded: a tenant's Secret of 1 MiB, or of thousands of credentials, is refused.
        let big = format!(
            r#"{{"auths":{{"a.io":{{"username":"u","password":"{}"}}}}}}"#,
            "p".repeat(CONFIG_MAX_BYTES)
        );
        assert!(parse(big.as_bytes(), false).is_err_and(|e| e.contains("KiB arcguard reads")));
        let many: BTreeMap<String, serde_json::Value> = (0..=CREDENTIALS_MAX)
            .map(|i| (format!("r{i}.io"), json!({"username": "u", "password": "p"})))
            .collect();
        let many = serde_json::to_vec(&json!({"auths": many})).expect("json");
        assert!(parse(&many, false).is_err_and(|e| e.contains("credentials, over the")));
        assert!(!format!("{:?}", parsed[0]).contains("pw"), "Debug must not show the password");
    }

    #[test]
    fn picks_the_most_specific_matching_key_as_the_kubelet_does() {
        let keys = [
            credential("*.azurecr.io"),
            credential("contoso.azurecr.io"),
            credential("contoso.azurecr.io/team"),
            credential("https://index.docker.io/v1/"),
            credential("localhost:5000"),
            credential("127.0.0.1:5000/private"),
        ];
        let cases = [
            ("contoso.azurecr.io", "team/app", Some("contoso.azurecr.io/team")),
            // The kubelet compares paths as strings.
            ("contoso.azurecr.io", "teamx/app", Some("contoso.azurecr.io/team")),
            ("contoso.azurecr.io", "other/app", Some("contoso.azurecr.io")),
            ("fabrikam.azurecr.io", "app", Some("*.azurecr.io")),
            // A glob stands for one part only.
            ("a.b.azurecr.io", "app", None),
            ("docker.io", "library/nginx", Some("https://index.docker.io/v1/")),
            ("localhost:5000", "app", Some("localhost:5000")),
            // Ports must be equal.
            ("localhost:5001", "app", None),
            ("localhost", "app", None),
            ("127.0.0.1:5000", "private/app", Some("127.0.0.1:5000/private")),
            ("127.0.0.1:5000", "privateer/app", Some("127.0.0.1:5000/private")),
            ("127.0.0.1:5000", "app", None),
            ("evil.io", "contoso.azurecr.io/app", None),
            // A leading /v1/ or /v2/ of a key is the registry itself; an image's path is kept.
            ("reg.io", "team/app", Some("https://reg.io/v2/team")),
            ("reg.io", "v1beta/app", None),
            ("reg.io", "beta/app", Some("reg.io/beta")),
            // Docker Hub's key is the fallback, after any key that matches.
            ("docker.io", "library/nginx", Some("docker.io/library")),
        ];
        let more = [credential("https://reg.io/v2/team"), credential("reg.io/beta")];
        let hub = [credential("https://index.docker.io/v1/"), credential("docker.io/library")];
        for (registry, repository, want) in cases {
            let keys: &[RegistryCredential] = match registry {
                "reg.io" => &more,
                "docker.io" if want == Some("docker.io/library") => &hub,
                _ => &keys,
            };
            let found = for_image(registry, repository, keys).map(|c| c.key.as_str());
            assert_eq!(found, want, "{registry}/{repository}");
        }
    }
}
