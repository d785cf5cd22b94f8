//! The kill -9 phase (`vmtest.phase=kill`): the real daemon (`/sbin/storaged`, a child
//! of this program, configured with the pool disk) is killed with SIGKILL at a random
//! moment during CSI CreateVolume (empty or from a snapshot), DeleteVolume,
//! CreateSnapshot or DeleteSnapshot, then started again. After each restart: the
//! catalog holds only ready entries, an acknowledged operation survived, an interrupted
//! one happened fully or not at all, retrying it under the same name succeeds, the
//! catalog matches what the test expects, and every volume activates with the marker
//! written into it before. At the end everything is deleted: the pool's used data
//! blocks are back at the empty pool's level and no thin id is left in the pool.

use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use storaged::catalog::{Catalog, Kind, State};
use storaged::csi::api::*;
use storaged::csi::Client;
use volume_capability::Mode;

use super::csi::{call, cap, create, stage, unstage};
use super::{disk, pattern, report};

const CONFIG: &str = "/etc/storaged-kill.toml";
const SOCKET: &str = "/run/storaged/csi.sock";
const DAEMON: &str = "/sbin/storaged";
const TRIALS: usize = 20;
const MIB: i64 = 1 << 20;
const VOLUME_BYTES: i64 = 8 * MIB;
/// A restore that asks for more than the snapshot holds.
const RESTORED_BYTES: i64 = 12 * MIB;
/// Marker blocks (4 KiB each) written at the start of every volume (64 KiB).
const MARK_BLOCKS: u64 = 16;

/// xorshift64*: reproducible from the printed seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn seed() -> u64 {
    let given = std::fs::read_to_string("/proc/cmdline")
        .unwrap_or_default()
        .split_whitespace()
        .find_map(|w| w.strip_prefix("vmtest.seed=").and_then(|s| s.parse().ok()));
    given.unwrap_or_else(|| {
        let mut b = [0u8; 8];
        let _ = std::fs::File::open("/dev/urandom").and_then(|f| f.read_exact_at(&mut b, 0));
        u64::from_le_bytes(b) | 1
    })
}

#[derive(Debug, Clone)]
enum Op {
    Create(String),
    /// From a snapshot, larger than it (12 MiB) or at its size.
    Restore(String, String, bool),
    Delete(String),
    Snapshot(String, String),
    DeleteSnapshot(String),
}

impl Op {
    /// The catalog entry the operation makes or removes.
    fn name(&self) -> &str {
        match self {
            Op::Create(n) | Op::Restore(n, ..) | Op::Delete(n) | Op::Snapshot(n, _) => n,
            Op::DeleteSnapshot(n) => n,
        }
    }

    fn creates(&self) -> bool {
        matches!(self, Op::Create(_) | Op::Restore(..) | Op::Snapshot(..))
    }

    fn kind(&self) -> &'static str {
        match self {
            Op::Create(_) => "CreateVolume",
            Op::Restore(_, _, false) => "CreateVolume(snapshot)",
            Op::Restore(_, _, true) => "CreateVolume(snapshot, larger)",
            Op::Delete(_) => "DeleteVolume",
            Op::Snapshot(..) => "CreateSnapshot",
            Op::DeleteSnapshot(_) => "DeleteSnapshot",
        }
    }
}

async fn send(c: &Client, op: &Op) -> Result<(), String> {
    let block = || cap(true, Mode::SingleNodeWriter);
    match op {
        Op::Create(n) => {
            let _: CreateVolumeResponse = call(
                c,
                "/csi.v1.Controller/CreateVolume",
                create(n, VOLUME_BYTES, block()),
            )
            .await?;
        }
        Op::Restore(n, snap, larger) => {
            let mut req = create(n, RESTORED_BYTES, block());
            if !larger {
                // No size asked for: the snapshot's.
                req.capacity_range = None;
            }
            req.volume_content_source = Some(VolumeContentSource {
                r#type: Some(volume_content_source::Type::Snapshot(
                    volume_content_source::SnapshotSource {
                        snapshot_id: snap.clone(),
                    },
                )),
            });
            let _: CreateVolumeResponse = call(c, "/csi.v1.Controller/CreateVolume", req).await?;
        }
        Op::Delete(n) => {
            let _: DeleteVolumeResponse = call(
                c,
                "/csi.v1.Controller/DeleteVolume",
                DeleteVolumeRequest {
                    volume_id: n.clone(),
                },
            )
            .await?;
        }
        Op::Snapshot(n, origin) => {
            let _: CreateSnapshotResponse = call(
                c,
                "/csi.v1.Controller/CreateSnapshot",
                CreateSnapshotRequest {
                    source_volume_id: origin.clone(),
                    name: n.clone(),
                    parameters: Default::default(),
                },
            )
            .await?;
        }
        Op::DeleteSnapshot(n) => {
            let _: DeleteSnapshotResponse = call(
                c,
                "/csi.v1.Controller/DeleteSnapshot",
                DeleteSnapshotRequest {
                    snapshot_id: n.clone(),
                },
            )
            .await?;
        }
    }
    Ok(())
}

struct Daemon {
    child: Child,
    client: Client,
}

fn write_config(pool: &Path) -> Result<(), String> {
    let text = format!(
        "state_dir = \"/var/lib/storaged\"\ncsi_socket = \"{SOCKET}\"\n\
         pool_device = \"{}\"\novercommit_percent = 300\n\
         metrics_listen = \"{}\"\n",
        pool.display(),
        super::metrics::ADDR
    );
    std::fs::create_dir_all("/etc").map_err(|e| format!("mkdir /etc: {e}"))?;
    std::fs::write(CONFIG, text).map_err(|e| format!("write {CONFIG}: {e}"))
}

/// Starts the daemon and waits until it answers Probe over its socket.
async fn start() -> Result<Daemon, String> {
    let mut child = Command::new(DAEMON)
        .args(["--config", CONFIG])
        .spawn()
        .map_err(|e| format!("start {DAEMON}: {e}"))?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(Some(st)) = child.try_wait() {
            return Err(format!("{DAEMON} exited at start: {st}"));
        }
        if let Ok(client) = Client::connect(Path::new(SOCKET)).await {
            let probe: Result<ProbeResponse, String> =
                call(&client, "/csi.v1.Identity/Probe", ProbeRequest {}).await;
            if probe.is_ok() {
                return Ok(Daemon { child, client });
            }
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("{DAEMON} did not serve within 60 s"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn kill(mut d: Daemon) -> Result<(), String> {
    // SAFETY: signalling our own child, which has not been waited for yet.
    if unsafe { libc::kill(d.child.id() as i32, libc::SIGKILL) } != 0 {
        return Err(format!("kill: {}", std::io::Error::last_os_error()));
    }
    d.child.wait().map(|_| ()).map_err(|e| format!("wait: {e}"))
}

/// Stops the daemon as init would (SIGTERM) and waits for it.
fn stop(mut d: Daemon) -> Result<(), String> {
    // SAFETY: as in `kill`.
    unsafe { libc::kill(d.child.id() as i32, libc::SIGTERM) };
    d.child.wait().map(|_| ()).map_err(|e| format!("wait: {e}"))
}

/// What the test knows exists: volumes with their marker's seed, snapshots with the seed
/// their origin held when they were taken.
#[derive(Default)]
struct Model {
    volumes: BTreeMap<String, u64>,
    snapshots: BTreeMap<String, u64>,
}

fn staging(name: &str) -> String {
    format!("/csi/staging/{name}")
}

fn node(name: &str) -> PathBuf {
    PathBuf::from(format!("/dev/mapper/edgepool-v-{name}"))
}

async fn stage_block(c: &Client, name: &str) -> Result<(), String> {
    let _: NodeStageVolumeResponse = call(
        c,
        "/csi.v1.Node/NodeStageVolume",
        stage(name, &staging(name), cap(true, Mode::SingleNodeWriter)),
    )
    .await?;
    Ok(())
}

async fn unstage_block(c: &Client, name: &str) -> Result<(), String> {
    let _: NodeUnstageVolumeResponse = call(
        c,
        "/csi.v1.Node/NodeUnstageVolume",
        unstage(name, &staging(name)),
    )
    .await?;
    Ok(())
}

/// Runs blocking device I/O off the runtime with a deadline: a device a crash left
/// suspended would block the reader for ever.
async fn device_io<T: Send + 'static>(
    what: String,
    f: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    match tokio::time::timeout(Duration::from_secs(20), tokio::task::spawn_blocking(f)).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => Err(format!("{what}: {e}")),
        Err(_) => Err(format!("{what}: no answer in 20 s (device suspended?)")),
    }
}

async fn write_marker(c: &Client, name: &str, seed: u64) -> Result<(), String> {
    stage_block(c, name).await?;
    let dev = node(name);
    device_io(format!("marker of {name}"), move || {
        let f = super::open_rw(&dev)?;
        for blk in 0..MARK_BLOCKS {
            f.write_all_at(&pattern(seed, blk), blk * 4096)
                .map_err(|e| format!("write {}: {e}", dev.display()))?;
        }
        f.sync_all()
            .map_err(|e| format!("fsync {}: {e}", dev.display()))
    })
    .await?;
    unstage_block(c, name).await
}

async fn check_marker(c: &Client, name: &str, seed: u64) -> Result<(), String> {
    stage_block(c, name).await?;
    let dev = node(name);
    device_io(format!("marker of {name}"), move || {
        super::check_pattern(&dev, seed, MARK_BLOCKS * 4096)
    })
    .await?;
    unstage_block(c, name).await
}

fn catalog(pool: &Path) -> Result<Catalog, String> {
    storaged::pool::read_catalog_of(pool)
        .map(|(_, c)| c)
        .map_err(|e| e.to_string())
}

/// Only ready entries, and exactly the model's names and kinds.
fn check_catalog(pool: &Path, model: &Model) -> Result<Catalog, String> {
    let cat = catalog(pool)?;
    if let Some(v) = cat.volumes.iter().find(|v| v.state != State::Ready) {
        return Err(format!("catalog entry {} is {:?}", v.name, v.state));
    }
    let mut have: Vec<(String, Kind)> = cat
        .volumes
        .iter()
        .map(|v| (v.name.clone(), v.kind))
        .collect();
    have.sort_by(|a, b| a.0.cmp(&b.0));
    let mut want: Vec<(String, Kind)> = model
        .volumes
        .keys()
        .map(|n| (n.clone(), Kind::Volume))
        .chain(model.snapshots.keys().map(|n| (n.clone(), Kind::Snapshot)))
        .collect();
    want.sort_by(|a, b| a.0.cmp(&b.0));
    if have != want {
        return Err(format!("catalog holds {have:?}, expected {want:?}"));
    }
    Ok(cat)
}

fn pool_status() -> Result<edge_dm::ThinPoolStatus, String> {
    let ctl = edge_dm::Control::open(Path::new("/dev")).map_err(|e| e.to_string())?;
    let lines = ctl.status("edgepool").map_err(|e| e.to_string())?;
    edge_dm::ThinPoolStatus::parse(lines.first().map(String::as_str).unwrap_or(""))
        .map_err(|e| e.to_string())
}

fn choose(rng: &mut Rng, model: &Model, i: usize) -> Op {
    let pick = |rng: &mut Rng, m: &BTreeMap<String, u64>| -> String {
        let k: Vec<&String> = m.keys().collect();
        k[rng.below(k.len() as u64) as usize].clone()
    };
    let r = rng.below(100);
    if model.volumes.is_empty() || (r < 30 && model.volumes.len() < 6) {
        return Op::Create(format!("v{i}"));
    }
    if r < 45 && !model.snapshots.is_empty() && model.volumes.len() < 6 {
        let larger = rng.below(2) == 0;
        return Op::Restore(format!("r{i}"), pick(rng, &model.snapshots), larger);
    }
    if r < 70 || model.volumes.len() >= 6 {
        return Op::Delete(pick(rng, &model.volumes));
    }
    if r < 90 && model.snapshots.len() < 4 {
        return Op::Snapshot(format!("s{i}"), pick(rng, &model.volumes));
    }
    if model.snapshots.is_empty() {
        return Op::Create(format!("v{i}"));
    }
    Op::DeleteSnapshot(pick(rng, &model.snapshots))
}

pub fn run() {
    let _ = edge_common::init_logging("info");
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return report("kill_trials", Err(format!("tokio runtime: {e}"))),
    };
    rt.block_on(async {
        let started = Instant::now();
        let r = trials().await;
        println!(
            "kill trials: {:.1} s in all",
            started.elapsed().as_secs_f64()
        );
        report("kill_trials", r);
    });
}

async fn trials() -> Result<(), String> {
    let seed = seed();
    println!("kill trials seed {seed} (vmtest.seed={seed} repeats this run)");
    let mut rng = Rng(seed);
    let pool = disk("pool0")?;
    storaged_guest::loopback_up()?;
    write_config(&pool)?;
    let mut d = start().await?;
    let empty = pool_status()?;
    println!(
        "empty pool: {}/{} data blocks, {}/{} metadata blocks used",
        empty.used_data_blocks,
        empty.total_data_blocks,
        empty.used_meta_blocks,
        empty.total_meta_blocks
    );

    // How long each operation takes here (TCG is slow and varies): the kill moments
    // spread over the whole call. The faster of two tries, so that a slow first
    // connection does not push most kills past the reply.
    let (mut create_ms, mut delete_ms) = (u64::MAX, u64::MAX);
    for _ in 0..2 {
        let t = Instant::now();
        send(&d.client, &Op::Create("warm".into())).await?;
        create_ms = create_ms.min(t.elapsed().as_millis() as u64);
        let t = Instant::now();
        send(&d.client, &Op::Delete("warm".into())).await?;
        delete_ms = delete_ms.min(t.elapsed().as_millis() as u64);
    }
    println!("unkilled CreateVolume {create_ms} ms, DeleteVolume {delete_ms} ms");
    let window = create_ms.max(delete_ms) + 2;

    let mut model = Model::default();
    // (acknowledged, found after restart) per trial.
    let mut outcomes = BTreeMap::<(bool, bool), usize>::new();
    for i in 0..TRIALS {
        let op = choose(&mut rng, &model, i);
        let delay = rng.below(window);
        // A snapshot of a volume in use: its device is suspended around create_snap.
        let staged_origin = match &op {
            Op::Snapshot(_, origin) => {
                stage_block(&d.client, origin).await?;
                Some(origin.clone())
            }
            _ => None,
        };
        let task = {
            let (c, op) = (d.client.clone(), op.clone());
            tokio::spawn(async move { send(&c, &op).await })
        };
        tokio::time::sleep(Duration::from_millis(delay)).await;
        kill(d)?;
        let acked = matches!(
            tokio::time::timeout(Duration::from_secs(10), task).await,
            Ok(Ok(Ok(())))
        );
        d = start().await?;
        let cat = catalog(&pool)?;
        if let Some(v) = cat.volumes.iter().find(|v| v.state != State::Ready) {
            return Err(format!(
                "trial {i}: after restart catalog entry {} is {:?}",
                v.name, v.state
            ));
        }
        let found = cat.get(op.name()).is_some();
        println!(
            "trial {i}: {} {} killed at {delay} ms: {}, {} after restart",
            op.kind(),
            op.name(),
            if acked {
                "acknowledged"
            } else {
                "not acknowledged"
            },
            if found { "present" } else { "absent" }
        );
        *outcomes.entry((acked, found)).or_default() += 1;
        if acked && found != op.creates() {
            return Err(format!(
                "trial {i}: {op:?} was acknowledged but is undone after the restart"
            ));
        }
        // Present means whole: a created volume activates (below, with its marker).
        if found && op.creates() {
            let v = cat.get(op.name()).map(|v| (v.kind, v.size_bytes));
            // A snapshot, and a restore at the snapshot's size, take the size of what
            // they come from, which an earlier larger restore may have made 12 MiB.
            let size_of = |source: &str| cat.get(source).map(|v| v.size_bytes);
            let want = match &op {
                Op::Snapshot(_, origin) => (Kind::Snapshot, size_of(origin)),
                Op::Restore(_, _, true) => (Kind::Volume, Some(RESTORED_BYTES as u64)),
                Op::Restore(_, snap, false) => (Kind::Volume, size_of(snap)),
                _ => (Kind::Volume, Some(VOLUME_BYTES as u64)),
            };
            if want.1.is_none() || v != Some((want.0, want.1.unwrap_or_default())) {
                return Err(format!("trial {i}: {op:?} left {v:?}"));
            }
        }
        // The CO retries with the same name: it must succeed whatever happened.
        send(&d.client, &op)
            .await
            .map_err(|e| format!("trial {i}: retry of {op:?}: {e}"))?;
        match &op {
            Op::Create(n) => {
                let s = rng.next();
                write_marker(&d.client, n, s).await?;
                model.volumes.insert(n.clone(), s);
            }
            Op::Restore(n, snap, _) => {
                model.volumes.insert(n.clone(), model.snapshots[snap]);
            }
            Op::Delete(n) => {
                model.volumes.remove(n);
            }
            Op::Snapshot(n, origin) => {
                model
                    .snapshots
                    .insert(n.clone(), model.volumes[origin.as_str()]);
            }
            Op::DeleteSnapshot(n) => {
                model.snapshots.remove(n);
            }
        }
        check_catalog(&pool, &model).map_err(|e| format!("trial {i}: {e}"))?;
        for (name, s) in &model.volumes {
            check_marker(&d.client, name, *s)
                .await
                .map_err(|e| format!("trial {i}: {e}"))?;
        }
        if let Some(origin) = staged_origin {
            // Already unstaged by check_marker unless it was deleted meanwhile.
            let _ = unstage_block(&d.client, &origin).await;
        }
    }
    println!("outcomes (acknowledged, present after restart): {outcomes:?}");

    // Everything goes: the pool must be as empty as it started, with no thin device left.
    for n in model.snapshots.keys() {
        send(&d.client, &Op::DeleteSnapshot(n.clone())).await?;
    }
    for n in model.volumes.keys() {
        send(&d.client, &Op::Delete(n.clone())).await?;
    }
    let metrics = super::metrics::scrape(super::metrics::ADDR).await?;
    let vols = metrics.get(r#"storaged_volumes{kind="volume"}"#).copied();
    if vols != Some(0) || metrics.get("storaged_pool_present") != Some(&1) {
        return Err(format!(
            "daemon's /metrics after deleting all: volumes {vols:?}"
        ));
    }
    stop(d)?;
    let end = pool_status()?;
    let cat = catalog(&pool)?;
    println!(
        "after deleting everything: {}/{} data blocks, {}/{} metadata blocks used; \
         thin ids used 1..{}",
        end.used_data_blocks,
        end.total_data_blocks,
        end.used_meta_blocks,
        end.total_meta_blocks,
        cat.next_thin_id
    );
    if !cat.volumes.is_empty() {
        return Err(format!("catalog not empty: {:?}", cat.volumes));
    }
    if end.used_data_blocks != empty.used_data_blocks {
        return Err(format!(
            "{} data blocks used after deleting everything, {} in the empty pool",
            end.used_data_blocks, empty.used_data_blocks
        ));
    }
    // A delete of an id the pool does not have fails: any that succeeds was leaked.
    let ctl = edge_dm::Control::open(Path::new("/dev")).map_err(|e| e.to_string())?;
    let leaked: Vec<u32> = (1..cat.next_thin_id)
        .filter(|id| ctl.message("edgepool", &format!("delete {id}")).is_ok())
        .collect();
    if !leaked.is_empty() {
        return Err(format!("thin ids left in the pool: {leaked:?}"));
    }
    Ok(())
}
