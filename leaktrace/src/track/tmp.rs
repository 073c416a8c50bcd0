//! Temp files: files a traced process created and nobody unlinked or renamed away.
//!
//! A creation counts when it must have made a new file (`O_CREAT|O_EXCL`, what `mkstemp`
//! and friends do), when it made an unnamed one (`O_TMPFILE`, what `tmpfile` does, alive only
//! while a descriptor holds it), or when an `O_CREAT` open made the file, as its birth time
//! says (in a temp directory, without birth times). Paths are
//! absolute and lexically normalized, so an unlink of `tmp/../tmp/x` from another directory
//! still matches.
use hashbrown::HashMap;

use crate::track::heap::StackId;

/// Directories whose files are temporary by convention.
pub const TEMP_DIRS: &[&str] = &["/tmp/", "/var/tmp/", "/dev/shm/"];

/// Absolute `path` (as given, or relative to `base`), with `.`, `..` and repeated `/`
/// resolved lexically.
pub fn normalize(base: &str, path: &str) -> String {
    let joined = if path.starts_with('/') {
        path.to_owned()
    } else {
        format!("{base}/{path}")
    };
    let mut parts: Vec<&str> = Vec::new();
    for part in joined.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    format!("/{}", parts.join("/"))
}

/// True when the path lies in a temp directory.
pub fn in_temp_dir(path: &str) -> bool {
    TEMP_DIRS.iter().any(|d| path.starts_with(d))
}

/// A temp file being watched.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TmpFile {
    /// The process that created it.
    pub pid: u32,
    /// The stack that created it.
    pub stack_id: StackId,
    /// Absolute path; for an unnamed (`O_TMPFILE`) file, the directory it lives in.
    pub path: String,
    /// Unnamed: it exists while descriptor `fd` of `pid` is open.
    pub unnamed: bool,
    /// The descriptor it was created on; only an unnamed file's is tracked to its close.
    pub fd: i32,
    /// When it was created, in ms since the heap table's epoch.
    pub created_ms: u32,
}

/// Every temp file created and not yet unlinked, renamed away or (unnamed) closed.
#[derive(Debug, Default)]
pub struct TmpFiles {
    named: HashMap<String, TmpFile>,
    unnamed: HashMap<(u32, i32), TmpFile>,
    /// How many were created, and how many went away.
    pub created: u64,
    /// How many went away (unlinked, renamed away, or closed when unnamed).
    pub removed: u64,
    /// Created while [`MAX_WATCHED`] files were watched already: counted, not watched.
    pub unwatched: u64,
}

/// Files watched at most: the tracer must not grow with a program that creates files by the
/// million (an extraction, an upload store), and each report looks at every one on disk.
pub const MAX_WATCHED: usize = 1 << 16;

impl TmpFiles {
    /// Starts watching `file`, unless [`MAX_WATCHED`] are watched already (then only counts it).
    pub fn created(&mut self, file: TmpFile) {
        self.created += 1;
        let watched = self.named.len() + self.unnamed.len();
        let replaces = !file.unnamed && self.named.contains_key(&file.path);
        if watched >= MAX_WATCHED && !replaces {
            self.unwatched += 1;
            return;
        }
        if file.unnamed {
            self.unnamed.insert((file.pid, file.fd), file);
        } else if let Some(old) = self.named.insert(file.path.clone(), file) {
            // Created again at a path we were watching: it was deleted in between.
            let _ = old;
            self.removed += 1;
        }
    }

    /// The path no longer names the file we watched (unlink, rename from or onto it).
    pub fn path_gone(&mut self, path: &str) {
        if self.named.remove(path).is_some() {
            self.removed += 1;
        }
    }

    /// Descriptor `fd` of `pid` was closed: an unnamed temp file behind it is gone.
    pub fn closed(&mut self, pid: u32, fd: i32) {
        if self.unnamed.remove(&(pid, fd)).is_some() {
            self.removed += 1;
        }
    }

    /// The process exited or exec'd away its descriptors: its unnamed temp files are gone.
    pub fn process_gone(&mut self, pid: u32) {
        let before = self.unnamed.len();
        self.unnamed.retain(|&(p, _), _| p != pid);
        self.removed += (before - self.unnamed.len()) as u64;
    }

    /// Every file still watched.
    pub fn files(&self) -> impl Iterator<Item = &TmpFile> {
        self.named.values().chain(self.unnamed.values())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &str) -> TmpFile {
        TmpFile {
            pid: 1,
            stack_id: 7,
            path: path.into(),
            unnamed: false,
            fd: 3,
            created_ms: 0,
        }
    }

    #[test]
    fn paths_are_made_absolute_and_normal() {
        assert_eq!(normalize("/home/u", "tmp/../x//y/./z"), "/home/u/x/y/z");
        assert_eq!(normalize("/home/u", "/tmp/a"), "/tmp/a");
        assert_eq!(normalize("/", "../../etc"), "/etc");
        assert!(in_temp_dir("/tmp/app-123"));
        assert!(!in_temp_dir("/tmpfoo/x"));
        assert!(!in_temp_dir("/var/log/app.log"));
    }

    #[test]
    fn unlinked_and_renamed_files_drop_out() {
        let mut t = TmpFiles::default();
        t.created(file("/tmp/a"));
        t.created(file("/tmp/b"));
        t.created(file("/tmp/c"));
        t.path_gone("/tmp/a");
        t.path_gone("/tmp/b");
        t.path_gone("/tmp/never-watched");
        let left: Vec<&str> = t.files().map(|f| f.path.as_str()).collect();
        assert_eq!(left, ["/tmp/c"]);
        assert_eq!((t.created, t.removed), (3, 2));
    }

    #[test]
    fn watching_is_bounded() {
        let mut t = TmpFiles::default();
        for i in 0..MAX_WATCHED + 10 {
            t.created(file(&format!("/tmp/f{i}")));
        }
        assert_eq!(t.files().count(), MAX_WATCHED);
        assert_eq!((t.created, t.unwatched), (MAX_WATCHED as u64 + 10, 10));
        // A watched path created again still replaces its entry.
        t.created(file("/tmp/f0"));
        assert_eq!(t.unwatched, 10);
    }

    #[test]
    fn unnamed_files_live_as_long_as_their_descriptor() {
        let mut t = TmpFiles::default();
        t.created(TmpFile {
            unnamed: true,
            fd: 4,
            ..file("/tmp")
        });
        t.created(TmpFile {
            unnamed: true,
            fd: 5,
            ..file("/tmp")
        });
        t.created(TmpFile {
            pid: 2,
            unnamed: true,
            fd: 4,
            ..file("/tmp")
        });
        t.closed(1, 4);
        assert_eq!(t.files().count(), 2);
        t.process_gone(2);
        assert_eq!(
            t.files().map(|f| (f.pid, f.fd)).collect::<Vec<_>>(),
            [(1, 5)]
        );
    }
}
