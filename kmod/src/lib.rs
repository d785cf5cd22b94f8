//! Kernel modules loaded from an ordered list: one path per line, relative to a modules
//! directory, already in dependency order (the image builder and the light VM write it;
//! there is no modules.dep to read). init loads `/etc/edge/modules` in both stages; the
//! light VM's guest programs load the initramfs's `/modules.order`.

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
    let text = match std::fs::read_to_string(list_file) {
        Ok(t) => t,
        Err(source) => {
            return vec![Error::List {
                path: list_file.to_owned(),
                source,
            }]
        }
    };
    parse_list(&text)
        .iter()
        .filter_map(|rel| load(&modules_dir.join(rel)).err())
        .collect()
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
}
