//! Reading `/proc/PID`: memory maps, names, status. Parsing is pure and unit-tested; the
//! readers are thin.
use std::{fs, io, path::PathBuf};

/// One line of `/proc/PID/maps`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Mapping {
    /// First address of the mapping.
    pub start: u64,
    /// Address just past the mapping's end.
    pub end: u64,
    /// Offset of `start` in the mapped file.
    pub offset: u64,
    /// `r` permission.
    pub readable: bool,
    /// `x` permission.
    pub executable: bool,
    /// `makedev(major, minor)` of the file's device.
    pub dev: u64,
    /// The file's inode number; 0 for anonymous mappings.
    pub inode: u64,
    /// The file's path as the process sees it, `[vdso]`-style names, or empty (anonymous).
    /// A trailing ` (deleted)` is removed and reported in `deleted`.
    pub path: String,
    /// The path ended in ` (deleted)`: the file was unlinked or replaced since it was mapped.
    pub deleted: bool,
}

impl Mapping {
    /// True for mappings of a regular file.
    pub fn is_file(&self) -> bool {
        self.inode != 0 && self.path.starts_with('/')
    }
}

/// Why `/proc/PID/maps` could not be parsed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("malformed line in /proc/PID/maps: {0:?}")]
pub struct MapsError(pub String);

fn hex(s: &str, line: &str) -> Result<u64, MapsError> {
    u64::from_str_radix(s, 16).map_err(|_| MapsError(line.to_owned()))
}

/// Parses the text of `/proc/PID/maps`.
pub fn parse_maps(text: &str) -> Result<Vec<Mapping>, MapsError> {
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        let bad = || MapsError(line.to_owned());
        // "start-end perms offset major:minor inode   path"
        let mut fields = line.splitn(6, ' ');
        let range = fields.next().ok_or_else(bad)?;
        let perms = fields.next().ok_or_else(bad)?;
        let offset = fields.next().ok_or_else(bad)?;
        let dev = fields.next().ok_or_else(bad)?;
        let inode = fields.next().ok_or_else(bad)?;
        let path = fields.next().unwrap_or("").trim_start();
        let (start, end) = range.split_once('-').ok_or_else(bad)?;
        let (major, minor) = dev.split_once(':').ok_or_else(bad)?;
        let (path, deleted) = match path.strip_suffix(" (deleted)") {
            Some(p) => (p, true),
            None => (path, false),
        };
        let perms = perms.as_bytes();
        if perms.len() < 4 {
            return Err(bad());
        }
        out.push(Mapping {
            start: hex(start, line)?,
            end: hex(end, line)?,
            offset: hex(offset, line)?,
            readable: perms[0] == b'r',
            executable: perms[2] == b'x',
            dev: makedev(hex(major, line)?, hex(minor, line)?),
            inode: inode.parse().map_err(|_| bad())?,
            path: path.to_owned(),
            deleted,
        });
    }
    Ok(out)
}

/// The kernel's `makedev` (new encoding), as `stat` reports `st_dev`.
pub fn makedev(major: u64, minor: u64) -> u64 {
    ((major & 0xffff_f000) << 32)
        | ((major & 0x0000_0fff) << 8)
        | ((minor & 0xffff_ff00) << 12)
        | (minor & 0x0000_00ff)
}

/// `/proc/PID/<name>`.
pub fn path(pid: u32, name: &str) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}/{name}"))
}

/// Reads and parses `/proc/PID/maps`. An exited process has no maps: `NotFound`.
pub fn read_maps(pid: u32) -> io::Result<Vec<Mapping>> {
    let text = fs::read_to_string(path(pid, "maps"))?;
    parse_maps(&text).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// The process's command name (`/proc/PID/comm`), or `?`.
pub fn comm(pid: u32) -> String {
    fs::read_to_string(path(pid, "comm")).map_or_else(|_| "?".into(), |s| s.trim_end().to_owned())
}

/// The process's command line (`/proc/PID/cmdline`), its arguments joined by spaces; `None`
/// when it cannot be read or is empty (a kernel thread, a zombie).
pub fn cmdline(pid: u32) -> Option<String> {
    let raw = fs::read(path(pid, "cmdline")).ok()?;
    let args: Vec<String> = raw
        .split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    (!args.is_empty()).then(|| args.join(" "))
}

/// True when `/proc/PID` exists and is not a zombie.
pub fn is_alive(pid: u32) -> bool {
    match fs::read_to_string(path(pid, "stat")) {
        // "pid (comm) S ...": the state follows the last ')'.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X'])),
        Err(_) => false,
    }
}

/// True when the thread-group leader `pid` is stopped (`T`), as after a `SIGSTOP`.
pub fn is_stopped(pid: u32) -> bool {
    fs::read_to_string(path(pid, "stat"))
        .ok()
        .and_then(|stat| {
            stat.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().starts_with('T'))
        })
        .unwrap_or(false)
}

/// The soft limit on open files of `pid` (`Max open files` in `/proc/PID/limits`).
pub fn open_files_limit(pid: u32) -> Option<u64> {
    parse_open_files_limit(&fs::read_to_string(path(pid, "limits")).ok()?)
}

fn parse_open_files_limit(limits: &str) -> Option<u64> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The effective capability mask of this process (`CapEff` in `/proc/self/status`).
pub fn effective_capabilities() -> io::Result<u64> {
    let status = fs::read_to_string("/proc/self/status")?;
    parse_cap_eff(&status).ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no CapEff"))
}

fn parse_cap_eff(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
}

/// Every process on the node (pids of `/proc`, in no order).
pub fn all_pids() -> io::Result<Vec<u32>> {
    Ok(fs::read_dir("/proc")?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect())
}

/// CPU time a process has used, in clock ticks (`utime + stime` of `/proc/PID/stat`).
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(path(pid, "stat")).ok()?;
    // The command name may hold spaces and parentheses: fields count from the last `)`.
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut fields = rest.split(' ').skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// True for a user-space process (kernel threads have no executable).
pub fn has_exe(pid: u32) -> bool {
    fs::read_link(path(pid, "exe")).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAPS: &str = "\
55d0c8a00000-55d0c8a01000 r--p 00000000 fd:01 1234567                    /usr/bin/demo
55d0c8a01000-55d0c8a02000 r-xp 00001000 fd:01 1234567                    /usr/bin/demo
55d0c9e2b000-55d0c9e4c000 rw-p 00000000 00:00 0                          [heap]
7f3a1c028000-7f3a1c1bd000 r-xp 00028000 08:01 2228                       /usr/lib/x86_64-linux-gnu/libc.so.6
7f3a1c400000-7f3a1c401000 r-xp 00000000 103:02 99                        /tmp/lib with space.so (deleted)
7ffd5a5f1000-7ffd5a5f3000 r-xp 00000000 00:00 0                          [vdso]
7f3a1c500000-7f3a1c501000 rw-p 00000000 00:00 0 
";

    #[test]
    fn parses_real_world_lines() {
        let maps = parse_maps(MAPS).unwrap();
        assert_eq!(maps.len(), 7);
        let exe = &maps[1];
        assert_eq!(
            (exe.start, exe.end, exe.offset),
            (0x55d0c8a01000, 0x55d0c8a02000, 0x1000)
        );
        assert!(exe.executable && exe.readable && exe.is_file());
        assert_eq!((exe.dev, exe.inode), (makedev(0xfd, 1), 1234567));
        assert_eq!(maps[2].path, "[heap]");
        assert!(!maps[2].is_file() && !maps[2].executable);
        assert_eq!(maps[3].offset, 0x28000);
        assert_eq!(maps[4].path, "/tmp/lib with space.so");
        assert!(maps[4].deleted);
        assert_eq!(maps[4].dev, makedev(0x103, 2));
        assert_eq!(maps[5].path, "[vdso]");
        assert_eq!(maps[6].path, "");
    }

    #[test]
    fn rejects_garbage() {
        assert!(parse_maps("hello world\n").is_err());
        assert!(parse_maps("1000-zz r-xp 0 fd:01 1 /x\n").is_err());
    }

    #[test]
    fn makedev_matches_glibc() {
        // glibc: makedev(8, 1) == 0x801, makedev(259, 2) == 0x10302
        assert_eq!(makedev(8, 1), 0x801);
        assert_eq!(makedev(259, 2), 0x10302);
    }

    #[test]
    fn open_files_limit_is_the_soft_limit() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
Max cpu time              unlimited            unlimited            seconds   \n\
Max open files            1024                 524288               files     \n";
        assert_eq!(parse_open_files_limit(limits), Some(1024));
        assert!(open_files_limit(std::process::id()).is_some());
    }

    #[test]
    fn cap_eff_is_read_from_status() {
        let status = "Name:\tx\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\n";
        assert_eq!(parse_cap_eff(status), Some(0x1ff_ffff_ffff));
        assert_eq!(parse_cap_eff("Name: x\n"), None);
    }

    #[test]
    fn this_process_is_alive_and_has_maps() {
        let pid = std::process::id();
        assert!(is_alive(pid));
        let argv: Vec<String> = std::env::args().collect();
        assert_eq!(cmdline(pid), Some(argv.join(" ")));
        assert!(
            read_maps(pid)
                .unwrap()
                .iter()
                .any(|m| m.executable && m.is_file())
        );
        assert!(!is_alive(u32::MAX - 1));
    }
}
