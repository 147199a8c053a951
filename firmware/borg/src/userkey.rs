//! The user's phrase for the commands that act as the user (`borg id show`, and the file
//! commands that build on it): from `--phrase-file`, or else kept in the user's config dir
//! (`$XDG_CONFIG_HOME/borg/phrase`, else `$HOME/.config/borg/phrase`), created on first use
//! with a warning to write the 24 words down.
//!
//! The kept file is written the way a key must be: mode 0600 from its first byte (never
//! created readable and narrowed later), to a temporary name, fsynced, then linked to its
//! name so that two commands starting at once end up with the same phrase, never with two.
//! A kept phrase file that others can read is refused, as ssh refuses such a key.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use borg_proto::mnemonic;

/// Where a user's phrase came from, and the phrase itself.
pub struct UserPhrase {
    pub phrase: String,
    pub passphrase: String,
    pub source: PathBuf,
    /// Created by this call (the caller has already warned on stderr).
    pub created: bool,
}

impl std::fmt::Debug for UserPhrase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the words.
        f.debug_struct("UserPhrase")
            .field("source", &self.source)
            .field("created", &self.created)
            .finish_non_exhaustive()
    }
}

/// The kept phrase's path: `$XDG_CONFIG_HOME/borg/phrase`, else `$HOME/.config/borg/phrase`.
pub fn default_phrase_path() -> Result<PathBuf> {
    let env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    phrase_path_from(env("XDG_CONFIG_HOME"), env("HOME"))
}

fn phrase_path_from(xdg: Option<PathBuf>, home: Option<PathBuf>) -> Result<PathBuf> {
    // Relative values are ignored, as the XDG spec says.
    let base = match (xdg.filter(|p| p.is_absolute()), home) {
        (Some(x), _) => x,
        (None, Some(h)) if h.is_absolute() => h.join(".config"),
        _ => bail!(
            "no place for your phrase: neither XDG_CONFIG_HOME nor HOME is set; \
             give --phrase-file FILE"
        ),
    };
    Ok(base.join("borg").join("phrase"))
}

/// The user's phrase: from `phrase_file` if given, else the kept one (created on first use,
/// with the warning printed to stderr).
pub fn load(phrase_file: Option<&Path>, passphrase_file: Option<&Path>) -> Result<UserPhrase> {
    let passphrase = match passphrase_file {
        Some(p) => fs::read_to_string(p)
            .with_context(|| format!("reading passphrase file {}", p.display()))?
            .trim_end_matches(['\n', '\r'])
            .to_string(),
        None => String::new(),
    };
    let (source, phrase, created) = match phrase_file {
        Some(path) => (path.to_path_buf(), read_phrase(path)?, false),
        None => {
            let path = default_phrase_path()?;
            let (phrase, created) = load_or_create(&path)?;
            if created {
                eprintln!(
                    "A new identity was made for you and kept in {} (readable by you only).\n\
                     Write these 24 words down and keep them secret: they are the only way to \
                     reach your files from another computer, and anyone who has them is you.\n\n  \
                     {phrase}\n",
                    path.display()
                );
            }
            (path, phrase, created)
        }
    };
    Ok(UserPhrase {
        phrase,
        passphrase,
        source,
        created,
    })
}

/// Read and check a phrase file (any permissions: it may sit on a FAT USB stick).
fn read_phrase(path: &Path) -> Result<String> {
    let text = fs::read_to_string(path)
        .with_context(|| format!("reading phrase file {}", path.display()))?;
    let phrase = text.split_whitespace().collect::<Vec<_>>().join(" ");
    mnemonic::parse_phrase(&phrase)
        .map_err(|e| anyhow!("{} does not hold a valid phrase: {e}", path.display()))?;
    Ok(phrase)
}

/// The kept phrase at `path`, made if there is none: (phrase, created).
fn load_or_create(path: &Path) -> Result<(String, bool)> {
    match fs::metadata(path) {
        Ok(meta) => {
            let mode = meta.permissions().mode();
            if mode & 0o077 != 0 {
                bail!(
                    "{} can be read by others (mode {:o}); a phrase is a key: \
                     chmod 600 {} and try again",
                    path.display(),
                    mode & 0o777,
                    path.display()
                );
            }
            return Ok((read_phrase(path)?, false));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    }
    let dir = path
        .parent()
        .ok_or_else(|| anyhow!("{} has no directory", path.display()))?;
    // 0700 for what we create (the XDG spec asks it of the config dir too).
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    let phrase = mnemonic::generate_phrase();
    let tmp = dir.join(format!(
        ".phrase.{}.{:016x}.tmp",
        std::process::id(),
        rand::random::<u64>()
    ));
    let written = (|| -> std::io::Result<()> {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(phrase.as_bytes())?;
        f.write_all(b"\n")?;
        f.sync_all()
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("writing {}", tmp.display()));
    }
    // A link fails if the name exists: whoever links first wins, the other reads theirs.
    let linked = fs::hard_link(&tmp, path);
    let _ = fs::remove_file(&tmp);
    match linked {
        Ok(()) => {
            if let Ok(d) = fs::File::open(dir) {
                let _ = d.sync_all();
            }
            Ok((phrase, true))
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok((read_phrase(path)?, false)),
        Err(e) => Err(e).with_context(|| format!("keeping the phrase in {}", path.display())),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn made_once_with_mode_0600_then_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("borg").join("phrase");
        let (first, created) = load_or_create(&path).unwrap();
        assert!(created);
        assert_eq!(first.split(' ').count(), 24);
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let (again, created) = load_or_create(&path).unwrap();
        assert!(!created);
        assert_eq!(again, first);
        // No temporary file is left behind.
        let names: Vec<_> = fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["phrase"]);
    }

    #[test]
    fn a_phrase_others_can_read_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("phrase");
        load_or_create(&path).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let err = load_or_create(&path).unwrap_err().to_string();
        assert!(err.contains("chmod 600"), "{err}");
    }

    #[test]
    fn a_file_without_a_valid_phrase_is_refused_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("phrase");
        fs::write(&path, "not twenty four words\n").unwrap();
        let err = format!("{:#}", load(Some(&path), None).unwrap_err());
        assert!(err.contains("does not hold a valid phrase"), "{err}");
    }

    #[test]
    fn commands_starting_at_once_share_one_phrase() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("borg").join("phrase");
        let got: Vec<(String, bool)> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| s.spawn(|| load_or_create(&path).unwrap()))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(got.iter().all(|(p, _)| *p == got[0].0));
        assert_eq!(got.iter().filter(|(_, created)| *created).count(), 1);
    }

    #[test]
    fn config_dir_follows_xdg_then_home() {
        let p = |x: Option<&str>, h: Option<&str>| {
            phrase_path_from(x.map(PathBuf::from), h.map(PathBuf::from))
        };
        assert_eq!(
            p(Some("/x"), Some("/h")).unwrap(),
            PathBuf::from("/x/borg/phrase")
        );
        assert_eq!(
            p(Some("rel"), Some("/h")).unwrap(),
            PathBuf::from("/h/.config/borg/phrase")
        );
        assert!(p(None, None).is_err());
    }
}
