//! Kernel modules loaded from an ordered list: one path per line, relative to a modules
//! directory, already in dependency order (the image builder and the light VM write it;
//! there is no modules.dep to read). init loads `/etc/edge/modules` in both stages; the
//! light VM's guest programs load the initramfs's `/modules.order`. A module the boot
//! does not need is loaded on demand instead, by the program that first needs it, from
//! its own list in [`ON_DEMAND_DIR`] ([`load_on_demand`]).

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("failed to read {path}: {source}")]
    List {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("failed to open {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("failed to load module {path}: {source}")]
    Load {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The module paths named in a list file: one per line, relative to the modules directory
/// (a leading `/` is dropped). Blank lines and `#` comments are skipped so the image
/// builder may annotate the list.
pub fn parse_list(text: &str) -> Vec<PathBuf> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| PathBuf::from(l.trim_start_matches('/')))
        .collect()
}

/// `/lib/modules/<uname -r>`: where the running kernel's modules live.
pub fn running_kernel_dir() -> PathBuf {
    let uts = rustix::system::uname();
    let release = uts.release().to_string_lossy().into_owned();
    Path::new("/lib/modules").join(release)
}

/// Loads one module file. A module that is already loaded (or built in and so present)
/// counts as loaded.
pub fn load(path: &Path) -> Result<(), Error> {
    let file = std::fs::File::open(path).map_err(|source| Error::Open {
        path: path.to_owned(),
        source,
    })?;
    match rustix::system::finit_module(&file, c"", 0) {
        Ok(()) | Err(rustix::io::Errno::EXIST) => Ok(()),
        Err(e) => Err(Error::Load {
            path: path.to_owned(),
            source: e.into(),
        }),
    }
}

/// Loads every module in `list_file` (paths relative to `modules_dir`), in order. One
/// failure does not stop the rest: the device it drives may be built into the kernel, or
/// the module may be a CPU-specific variant (crc32c-intel) with a generic twin in the list.
/// Returns every failure; an unreadable list is one.
pub fn load_list(list_file: &Path, modules_dir: &Path) -> Vec<Error> {
    load_listed(list_file, modules_dir, None)
}

/// The modules in `list_file` loaded in order; with `loaded` (the kernel's directory of
/// loaded modules), a missing list is nothing to load and a module shown there is
/// skipped.
fn load_listed(list_file: &Path, modules_dir: &Path, loaded: Option<&Path>) -> Vec<Error> {
    let text = match std::fs::read_to_string(list_file) {
        Ok(t) => t,
        Err(e) if loaded.is_some() && e.kind() == std::io::ErrorKind::NotFound => {
            return Vec::new()
        }
        Err(source) => {
            return vec![Error::List {
                path: list_file.to_owned(),
                source,
            }]
        }
    };
    parse_list(&text)
        .iter()
        .filter(|rel| loaded.is_none_or(|l| !l.join(module_name(&rel.to_string_lossy())).exists()))
        .filter_map(|rel| load(&modules_dir.join(rel)).err())
        .collect()
}

/// Where the image builder writes one list per on-demand module, named after it
/// (`kernel.on_demand_modules`, docs/image.md): the module and what it needs that the
/// boot's lists do not load.
pub const ON_DEMAND_DIR: &str = "/etc/edge/modules-on-demand";

/// Loads the on-demand module `name` (e.g. `xfs` before the first XFS mount) with what
/// it needs, unless loaded already. Nothing to do where there is no such list: a system
/// that loads it at boot, has it built in, or is not ours. Returns every failure.
pub fn load_on_demand(name: &str) -> Vec<Error> {
    load_on_demand_from(
        &Path::new(ON_DEMAND_DIR).join(name),
        &running_kernel_dir(),
        Path::new("/sys/module"),
    )
}

/// [`load_on_demand`] with its places given: the list, the modules directory and the
/// kernel's directory of loaded modules, where one already loaded is skipped (loading
/// it again would cost the whole load before the kernel refuses it).
fn load_on_demand_from(list_file: &Path, modules_dir: &Path, loaded: &Path) -> Vec<Error> {
    load_listed(list_file, modules_dir, Some(loaded))
}

/// The kernel's name of a module file: `kernel/fs/xfs/xfs.ko` is `xfs`, `dm-bufio.ko.xz`
/// is `dm_bufio` (as under /sys/module and in modules.dep's lookups).
pub fn module_name(path: &str) -> String {
    let base = path.rsplit('/').next().unwrap_or(path);
    base.split(".ko").next().unwrap_or(base).replace('-', "_")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_keeps_order_and_skips_comments_and_blanks() {
        let list = "# storage\nkernel/drivers/nvme/host/nvme-core.ko\n\n  kernel/drivers/nvme/host/nvme.ko  \n/kernel/fs/erofs/erofs.ko\n";
        assert_eq!(
            parse_list(list),
            vec![
                PathBuf::from("kernel/drivers/nvme/host/nvme-core.ko"),
                PathBuf::from("kernel/drivers/nvme/host/nvme.ko"),
                PathBuf::from("kernel/fs/erofs/erofs.ko"),
            ]
        );
    }

    #[test]
    fn missing_files_are_reported_by_name_and_the_rest_still_tried() {
        let dir = tempfile::tempdir().unwrap();
        let list = dir.path().join("modules");
        std::fs::write(&list, "a/missing.ko\nb/also-missing.ko\n").unwrap();
        let errors: Vec<String> = load_list(&list, dir.path())
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(errors.len(), 2);
        assert!(errors[0].contains("a/missing.ko"), "{}", errors[0]);
        assert!(errors[1].contains("b/also-missing.ko"), "{}", errors[1]);
    }

    #[test]
    fn unreadable_list_is_one_named_error() {
        let errors = load_list(Path::new("/nonexistent/edge/modules"), Path::new("/"));
        assert_eq!(errors.len(), 1);
        assert!(matches!(errors[0], Error::List { .. }), "{:?}", errors[0]);
        assert!(errors[0].to_string().contains("/nonexistent/edge/modules"));
    }

    #[test]
    fn on_demand_loads_what_is_not_loaded_and_nothing_without_a_list() {
        let dir = tempfile::tempdir().unwrap();
        let (modules, loaded) = (dir.path().join("modules"), dir.path().join("sys"));
        std::fs::create_dir_all(loaded.join("dm_bufio")).unwrap();
        // No list: nothing to load here, and no error.
        assert!(load_on_demand_from(&dir.path().join("xfs"), &modules, &loaded).is_empty());
        // A module already loaded is skipped (its file is not even opened); one that is
        // not is loaded, and here fails by name, as its file is missing.
        let list = dir.path().join("fsx");
        std::fs::write(
            &list,
            "kernel/drivers/md/dm-bufio.ko\nkernel/fs/fsx/fsx.ko.xz\n",
        )
        .unwrap();
        let errors = load_on_demand_from(&list, &modules, &loaded);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(matches!(&errors[0], Error::Open { path, .. } if path.ends_with("fsx.ko.xz")));
    }

    #[test]
    fn module_names_are_the_kernels() {
        assert_eq!(module_name("kernel/fs/xfs/xfs.ko"), "xfs");
        assert_eq!(module_name("a/dm-bufio.ko.xz"), "dm_bufio");
    }
}
