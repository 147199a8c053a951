//! The installer `borg init` gives PID 1 ([`borg_system::update`]): fetch the approved
//! release file from a node, judge it again against the image's own trust root, and write its
//! image into the inactive slot through [`crate::update_fetch::install`]. PID 1 does not take
//! the node's word that a release is approved: the node runs unprivileged, PID 1 is root.

use anyhow::{anyhow, bail, Context, Result};
use borg_cells::ota::{disk, image_version};
use borg_ota::verify::NodeView;
use borg_ota::{ReleaseFile, TrustedRoot};
use borg_proto::identity::SecretKey;
use borg_system::update::InstallJob;
use serde_json::json;

use crate::files_net;

/// The [`borg_system::update::Installer`] of this binary.
pub fn install(job: &InstallJob) -> Result<(), String> {
    run(job).map_err(|e| format!("{e:#}"))
}

fn run(job: &InstallJob) -> Result<()> {
    let via = job.via.as_deref().unwrap_or("127.0.0.1");
    let endpoints = files_net::parse_node(via)?;
    let base = crate::release_net::receptor(via)?;
    let key = SecretKey::generate();
    let answer = files_net::runtime()?
        .block_on(files_net::call(
            base,
            &key,
            borg_cells::ota::GET_KIND,
            json!({ "manifest": job.manifest }),
        ))
        .map_err(|e| anyhow!("asking {base} for release {}: {e}", job.version))?;
    let release = ReleaseFile::decode(answer["release"].to_string().as_bytes())
        .context("the node's release file")?;
    if release.manifest.digest().to_string() != job.manifest {
        bail!(
            "the node answered with another release than {}",
            job.manifest
        );
    }
    if release.manifest.image.size > job.len {
        bail!(
            "the image is {} bytes; slot partition is {}",
            release.manifest.image.size,
            job.len
        );
    }
    let signed = disk::read_image_root(&disk::image_root_path()).map_err(|e| anyhow!(e))?;
    let root = TrustedRoot::anchor(&signed).context("the image's trust root")?;
    let view = NodeView {
        now_ms: borg_net::node::now_ms(),
        // Never judge expiry before the build time (a Pi boots at 1970 until network time).
        floor_ms: borg_proto::build::BUILD_UNIX_S * 1000,
        running: Some(image_version()),
        board: disk::detect_board(),
        refused: Default::default(),
    };
    crate::update_fetch::install(
        endpoints.shard,
        &release,
        &root,
        &view,
        &job.disk,
        job.offset,
    )
    .map(|s| {
        tracing::info!(
            "update: {} chunks fetched, {} already in the slot, {} bytes in {:.1} s; read back in {:.1} s",
            s.fetched,
            s.kept,
            s.size,
            s.fetch_s,
            s.verify_s
        )
    })
}
