//! Running the `borg` CLI from a test: in a directory, quietly, with the exit status checked
//! and both output streams in the failure message.

use std::path::Path;
use std::process::{Command, Output};

/// `borg ARGS` in `dir`, logging off.
pub fn borg(dir: &Path, args: &[&str]) -> Output {
    Command::new(crate::borg_bin())
        .current_dir(dir)
        .env("BORG_LOG", "off")
        .args(args)
        .output()
        .expect("running the borg binary")
}

/// Standard output and standard error together.
pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `borg ARGS` must succeed; its standard output.
#[track_caller]
pub fn ok(dir: &Path, args: &[&str]) -> String {
    let o = borg(dir, args);
    assert!(o.status.success(), "borg {args:?} failed:\n{}", text(&o));
    String::from_utf8_lossy(&o.stdout).to_string()
}

/// `borg ARGS` must fail; what it printed.
#[track_caller]
pub fn fails(dir: &Path, args: &[&str]) -> String {
    let o = borg(dir, args);
    assert!(
        !o.status.success(),
        "borg {args:?} should fail:\n{}",
        text(&o)
    );
    text(&o)
}
