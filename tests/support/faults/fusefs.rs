//! A pass-through FUSE file system that fails chosen operations with a chosen errno.
//!
//! [`FaultFs::mount`] mounts, at an empty directory, a view of a backing directory: every
//! operation is carried out on the backing directory, so the files are real and outlive the
//! mount. The kernel's FUSE driver hands an error the daemon returns straight to the
//! application's system call, so `vmm` meets `EIO` exactly as it would from a failing disk
//! or a network file system: from `write(2)`, `fsync(2)`, `rename(2)`, `open(2)` or
//! `read(2)`.
//!
//! Which operations fail is a [`Plan`]: the `n`-th matching operation (counted from the
//! moment the plan is set) fails, and with `sticky` every later one too (a dead disk). No
//! write-back cache is negotiated, so every `write(2)` reaches the daemon synchronously.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, UNIX_EPOCH};

use fuser::{
    AccessFlags, Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, LockOwner, MountOption, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow,
    WriteFlags,
};

/// Kinds of operations a [`Plan`] can fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// `write(2)` to a file.
    Write,
    /// `fsync(2)`/`fdatasync(2)` of a file or directory.
    Fsync,
    /// `rename(2)`.
    Rename,
    /// Creating a file or directory.
    Create,
    /// `read(2)` from a file.
    Read,
    /// Any of write, fsync, rename, create, unlink, rmdir, truncate.
    AnyChange,
}

impl Op {
    fn matches(self, op: Op) -> bool {
        self == op || (self == Op::AnyChange && op != Op::Read)
    }
}

/// Which operation fails, and how.
#[derive(Clone, Copy, Debug)]
pub struct Plan {
    /// The kind of operation counted.
    pub op: Op,
    /// The first matching operation that fails (1 = the next one).
    pub nth: u64,
    /// The errno returned.
    pub errno: i32,
    /// Every matching operation after the `nth` fails too.
    pub sticky: bool,
    /// Count only operations on files whose name contains this (for a rename: the new
    /// name), e.g. `"state"` to fail the state file's write.
    pub name: Option<&'static str>,
}

impl Plan {
    /// The `nth` operation of kind `op` fails with `EIO`, once.
    pub fn eio(op: Op, nth: u64) -> Plan {
        Plan {
            op,
            nth,
            errno: libc::EIO,
            sticky: false,
            name: None,
        }
    }

    /// The first operation of kind `op` on a file whose name contains `name` fails with
    /// `EIO`.
    pub fn eio_on(op: Op, name: &'static str) -> Plan {
        Plan {
            name: Some(name),
            ..Plan::eio(op, 1)
        }
    }
}

#[derive(Default)]
struct Faults {
    plan: Option<Plan>,
    seen: u64,
    injected: u64,
}

/// The shared switch of a mounted [`FaultFs`].
#[derive(Clone, Default)]
pub struct Control(Arc<Mutex<Faults>>);

impl Control {
    fn lock(&self) -> MutexGuard<'_, Faults> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Arms `plan` (counting starts now).
    pub fn set(&self, plan: Plan) {
        let mut f = self.lock();
        f.plan = Some(plan);
        f.seen = 0;
        f.injected = 0;
    }

    /// Disarms; returns how many operations failed under the last plan.
    pub fn clear(&self) -> u64 {
        let mut f = self.lock();
        f.plan = None;
        f.injected
    }

    /// Matching operations seen since the plan was set.
    pub fn seen(&self) -> u64 {
        self.lock().seen
    }

    /// Errors injected since the plan was set.
    pub fn injected(&self) -> u64 {
        self.lock().injected
    }

    /// `Err(errno)` when this operation is to fail.
    fn check(&self, op: Op, name: &OsStr) -> Result<(), Errno> {
        let mut f = self.lock();
        let Some(p) = f.plan else { return Ok(()) };
        if !p.op.matches(op) {
            return Ok(());
        }
        if let Some(want) = p.name
            && !name.to_string_lossy().contains(want)
        {
            return Ok(());
        }
        f.seen += 1;
        if f.seen == p.nth || (p.sticky && f.seen > p.nth) {
            f.injected += 1;
            return Err(Errno::from_i32(p.errno));
        }
        Ok(())
    }
}

struct Node {
    parent: u64,
    name: OsString,
}

struct Inner {
    root: PathBuf,
    nodes: HashMap<u64, Node>,
    by_path: HashMap<(u64, OsString), u64>,
    files: HashMap<u64, (File, OsString)>,
}

impl Inner {
    fn path(&self, ino: u64) -> Option<PathBuf> {
        let mut parts = Vec::new();
        let mut cur = ino;
        while cur != 1 {
            let n = self.nodes.get(&cur)?;
            parts.push(n.name.clone());
            cur = n.parent;
        }
        let mut p = self.root.clone();
        for part in parts.iter().rev() {
            p.push(part);
        }
        Some(p)
    }

    fn ino_for(&mut self, parent: u64, name: &OsStr, next: &AtomicU64) -> u64 {
        let key = (parent, name.to_os_string());
        if let Some(&i) = self.by_path.get(&key) {
            return i;
        }
        let i = next.fetch_add(1, Ordering::Relaxed);
        self.nodes.insert(
            i,
            Node {
                parent,
                name: name.to_os_string(),
            },
        );
        self.by_path.insert(key, i);
        i
    }

    fn forget_name(&mut self, parent: u64, name: &OsStr) {
        if let Some(i) = self.by_path.remove(&(parent, name.to_os_string())) {
            self.nodes.remove(&i);
        }
    }
}

/// The pass-through file system served by the FUSE session.
struct FaultFs {
    inner: Mutex<Inner>,
    next_ino: AtomicU64,
    next_fh: AtomicU64,
    control: Control,
}

const TTL: Duration = Duration::ZERO;

fn errno(e: std::io::Error) -> Errno {
    Errno::from_i32(e.raw_os_error().unwrap_or(libc::EIO))
}

fn attr(ino: u64, m: &fs::Metadata) -> FileAttr {
    let t = |s: i64, ns: i64| UNIX_EPOCH + Duration::new(s.max(0) as u64, ns as u32);
    let ft = m.file_type();
    FileAttr {
        ino: INodeNo(ino),
        size: m.size(),
        blocks: m.blocks(),
        atime: t(m.atime(), m.atime_nsec()),
        mtime: t(m.mtime(), m.mtime_nsec()),
        ctime: t(m.ctime(), m.ctime_nsec()),
        crtime: t(m.ctime(), m.ctime_nsec()),
        kind: FileType::from_std(ft).unwrap_or(FileType::RegularFile),
        perm: (m.mode() & 0o7777) as u16,
        nlink: m.nlink() as u32,
        uid: m.uid(),
        gid: m.gid(),
        rdev: m.rdev() as u32,
        blksize: 4096,
        flags: 0,
    }
}

impl FaultFs {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn path(&self, ino: INodeNo) -> Result<PathBuf, Errno> {
        self.lock().path(ino.0).ok_or(Errno::ENOENT)
    }

    fn child(&self, parent: INodeNo, name: &OsStr) -> Result<PathBuf, Errno> {
        Ok(self.path(parent)?.join(name))
    }

    /// Looks `name` up in `parent` on the backing directory and returns its attributes.
    fn entry(&self, parent: INodeNo, name: &OsStr) -> Result<FileAttr, Errno> {
        let p = self.child(parent, name)?;
        let m = fs::symlink_metadata(&p).map_err(errno)?;
        let ino = self.lock().ino_for(parent.0, name, &self.next_ino);
        Ok(attr(ino, &m))
    }

    /// The open file `fh` and its name.
    fn file(&self, fh: FileHandle) -> Result<(File, OsString), Errno> {
        let inner = self.lock();
        let (f, name) = inner.files.get(&fh.0).ok_or(Errno::EBADF)?;
        Ok((f.try_clone().map_err(errno)?, name.clone()))
    }

    fn add_file(&self, f: File, path: &Path) -> FileHandle {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        let name = path.file_name().unwrap_or_default().to_os_string();
        self.lock().files.insert(fh, (f, name));
        FileHandle(fh)
    }
}

impl Filesystem for FaultFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.entry(parent, name) {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let r = self
            .path(ino)
            .and_then(|p| fs::symlink_metadata(p).map_err(errno));
        match r {
            Ok(m) => reply.attr(&TTL, &attr(ino.0, &m)),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<std::time::SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<std::time::SystemTime>,
        _chgtime: Option<std::time::SystemTime>,
        _bkuptime: Option<std::time::SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let r = (|| {
            let p = self.path(ino)?;
            if let Some(size) = size {
                self.control
                    .check(Op::AnyChange, p.file_name().unwrap_or_default())?;
                OpenOptions::new()
                    .write(true)
                    .open(&p)
                    .and_then(|f| f.set_len(size))
                    .map_err(errno)?;
            }
            if let Some(mode) = mode {
                fs::set_permissions(&p, fs::Permissions::from_mode(mode & 0o7777))
                    .map_err(errno)?;
            }
            fs::symlink_metadata(&p).map_err(errno)
        })();
        match r {
            Ok(m) => reply.attr(&TTL, &attr(ino.0, &m)),
            Err(e) => reply.error(e),
        }
    }

    fn mkdir(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        let r = (|| {
            self.control.check(Op::Create, name)?;
            let p = self.child(parent, name)?;
            fs::create_dir(&p).map_err(errno)?;
            let _ = fs::set_permissions(&p, fs::Permissions::from_mode(mode & 0o7777));
            self.entry(parent, name)
        })();
        match r {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let r = (|| {
            self.control.check(Op::AnyChange, name)?;
            fs::remove_file(self.child(parent, name)?).map_err(errno)?;
            self.lock().forget_name(parent.0, name);
            Ok(())
        })();
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let r = (|| {
            self.control.check(Op::AnyChange, name)?;
            fs::remove_dir(self.child(parent, name)?).map_err(errno)?;
            self.lock().forget_name(parent.0, name);
            Ok(())
        })();
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let r = (|| {
            self.control.check(Op::Rename, newname)?;
            if !flags.is_empty() {
                return Err(Errno::EINVAL);
            }
            let from = self.child(parent, name)?;
            let to = self.child(newparent, newname)?;
            fs::rename(&from, &to).map_err(errno)?;
            let mut inner = self.lock();
            inner.forget_name(newparent.0, newname);
            if let Some(i) = inner.by_path.remove(&(parent.0, name.to_os_string())) {
                inner
                    .by_path
                    .insert((newparent.0, newname.to_os_string()), i);
                inner.nodes.insert(
                    i,
                    Node {
                        parent: newparent.0,
                        name: newname.to_os_string(),
                    },
                );
            }
            Ok(())
        })();
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let r = (|| {
            let p = self.path(ino)?;
            let acc = flags.0 & libc::O_ACCMODE;
            let f = OpenOptions::new()
                .read(acc != libc::O_WRONLY)
                .write(acc != libc::O_RDONLY)
                .custom_flags(flags.0 & libc::O_TRUNC)
                .open(&p)
                .map_err(errno)?;
            Ok(self.add_file(f, &p))
        })();
        match r {
            Ok(fh) => reply.opened(fh, FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let r = (|| {
            let (f, name) = self.file(fh)?;
            self.control.check(Op::Read, &name)?;
            let mut buf = vec![0u8; size as usize];
            let mut n = 0;
            while n < buf.len() {
                match f.read_at(&mut buf[n..], offset + n as u64).map_err(errno)? {
                    0 => break,
                    k => n += k,
                }
            }
            buf.truncate(n);
            Ok(buf)
        })();
        match r {
            Ok(b) => reply.data(&b),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _wflags: WriteFlags,
        _flags: OpenFlags,
        _lock: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let r = (|| {
            let (f, name) = self.file(fh)?;
            self.control.check(Op::Write, &name)?;
            f.write_all_at(data, offset).map_err(errno)
        })();
        match r {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.lock().files.remove(&fh.0);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let r = (|| {
            let (f, name) = self.file(fh)?;
            self.control.check(Op::Fsync, &name)?;
            if datasync {
                f.sync_data()
            } else {
                f.sync_all()
            }
            .map_err(errno)
        })();
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let r = self
            .path(ino)
            .and_then(|p| Ok((File::open(&p).map_err(errno)?, p)));
        match r {
            Ok((f, p)) => reply.opened(self.add_file(f, &p), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let r = (|| {
            let p = self.path(ino)?;
            let mut entries = vec![
                (ino.0, FileType::Directory, OsString::from(".")),
                (1, FileType::Directory, OsString::from("..")),
            ];
            for e in fs::read_dir(&p).map_err(errno)? {
                let e = e.map_err(errno)?;
                let kind = e
                    .file_type()
                    .ok()
                    .and_then(FileType::from_std)
                    .unwrap_or(FileType::RegularFile);
                let name = e.file_name();
                let i = self.lock().ino_for(ino.0, &name, &self.next_ino);
                entries.push((i, kind, name));
            }
            Ok(entries)
        })();
        match r {
            Ok(entries) => {
                for (k, (i, kind, name)) in entries.into_iter().enumerate().skip(offset as usize) {
                    if reply.add(INodeNo(i), (k + 1) as u64, kind, name) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(e),
        }
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.lock().files.remove(&fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let r = (|| {
            let (f, name) = self.file(fh)?;
            self.control.check(Op::Fsync, &name)?;
            f.sync_all().map_err(errno)
        })();
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let root = self.lock().root.clone();
        let c = std::ffi::CString::new(root.as_os_str().as_encoded_bytes()).unwrap_or_default();
        // SAFETY: statvfs writes into the zeroed struct; the path is a valid C string.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
            return reply.error(Errno::EIO);
        }
        reply.statfs(
            st.f_blocks,
            st.f_bfree,
            st.f_bavail,
            st.f_files,
            st.f_ffree,
            st.f_bsize as u32,
            255,
            st.f_frsize as u32,
        );
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        reply.ok();
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let r = (|| {
            self.control.check(Op::Create, name)?;
            let p = self.child(parent, name)?;
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .custom_flags(flags & (libc::O_EXCL | libc::O_TRUNC))
                .mode(mode & 0o7777)
                .open(&p)
                .map_err(errno)?;
            let a = self.entry(parent, name)?;
            Ok((a, self.add_file(f, &p)))
        })();
        match r {
            Ok((a, fh)) => reply.created(&TTL, &a, Generation(0), fh, FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }
}

/// A mounted [`FaultFs`]; unmounted (lazily) when dropped.
pub struct Mounted {
    session: Option<fuser::BackgroundSession>,
    mountpoint: PathBuf,
    /// The fault switch.
    pub control: Control,
}

impl Mounted {
    /// Mounts a view of `backing` at `mountpoint` (an empty directory).
    pub fn mount(backing: &Path, mountpoint: &Path) -> Result<Mounted, String> {
        let control = Control::default();
        let fs = FaultFs {
            inner: Mutex::new(Inner {
                root: backing.to_path_buf(),
                nodes: HashMap::new(),
                by_path: HashMap::new(),
                files: HashMap::new(),
            }),
            next_ino: AtomicU64::new(2),
            next_fh: AtomicU64::new(1),
            control: control.clone(),
        };
        let mut cfg = Config::default();
        cfg.mount_options = vec![
            MountOption::FSName("vmm-faultfs".into()),
            MountOption::DefaultPermissions,
        ];
        cfg.n_threads = Some(4);
        let session = fuser::spawn_mount(fs, mountpoint, &cfg)
            .map_err(|e| format!("mounting the fault-injecting FUSE file system: {e}"))?;
        Ok(Mounted {
            session: Some(session),
            mountpoint: mountpoint.to_path_buf(),
            control,
        })
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        &self.mountpoint
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        self.control.clear();
        if let Some(s) = self.session.take() {
            let _ = s.umount_and_join();
        }
        // A file still open by a killed child can keep the mount busy: detach it.
        let c = std::ffi::CString::new(self.mountpoint.as_os_str().as_encoded_bytes())
            .unwrap_or_default();
        // SAFETY: umount2 with a valid C string; failure (not mounted) is ignored.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
}
