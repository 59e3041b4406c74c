//! Network namespaces: a handle on a pod's netns, running code inside it, and finding it.
//!
//! The node process never changes its own namespace: [`NetNs::run`] enters the namespace on a
//! dedicated short-lived thread. Sockets stay in the namespace they were created in, so a
//! listener opened through a [`NetNs`] serves that pod even though ztunnel runs on the host.

use std::collections::HashSet;
use std::fmt;
use std::fs::File;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use netlink_packet_core::{NLM_F_DUMP, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use nix::sched::{CloneFlags, setns};
use nix::sys::stat::fstat;
use nix::sys::statfs::{NSFS_MAGIC, fstatfs};
use socket2::{Domain, Protocol, Socket, Type};

use super::netlink::NetlinkSocket;
use super::{Error, Result};

/// Where `ip netns add` pins named namespaces.
const NAMED_NETNS_DIR: &str = "/var/run/netns";

/// The backlog of listeners opened in a pod (the kernel caps it at `somaxconn`).
const LISTEN_BACKLOG: i32 = 1024;

/// An open network namespace, plus a description for error messages.
///
/// Holding the handle keeps the namespace alive even after its last process exits or its
/// `/var/run/netns` entry is removed, so rules and sockets set up through one handle never end
/// up half in a namespace that vanished midway.
#[derive(Debug)]
pub struct NetNs {
    fd: OwnedFd,
    description: String,
}

/// Identifies a namespace (device and inode of its nsfs file): two handles with the same id are
/// the same namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NetNsId {
    dev: u64,
    ino: u64,
}

impl fmt::Display for NetNsId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "net:[{}]", self.ino)
    }
}

impl NetNs {
    /// Opens a namespace file (`/proc/<pid>/ns/net`, a bind mount of one, ...).
    pub fn open(path: impl AsRef<Path>, description: impl Into<String>) -> Result<Self> {
        let description = description.into();
        let open_error = |source| Error::Open {
            netns: description.clone(),
            source,
        };
        let file = File::open(path.as_ref()).map_err(open_error)?;
        // Catches a stale `/var/run/netns` entry whose bind mount is gone, or a wrong path,
        // before anything tries to enter it.
        let filesystem = fstatfs(&file).map_err(|errno| open_error(errno.into()))?;
        if filesystem.filesystem_type() != NSFS_MAGIC {
            return Err(Error::NotANamespace { netns: description });
        }
        Ok(Self {
            fd: file.into(),
            description,
        })
    }

    /// Opens a named namespace, as created by `ip netns add <name>`.
    pub fn from_name(name: &str) -> Result<Self> {
        let invalid = |reason| Error::InvalidName {
            name: name.to_owned(),
            reason,
        };
        if name.is_empty() {
            return Err(invalid("it is empty"));
        }
        if name == "." || name == ".." || name.contains('/') || name.contains('\0') {
            return Err(invalid("it must be a plain file name"));
        }
        let path = PathBuf::from(NAMED_NETNS_DIR).join(name);
        let description = format!("{name:?} ({})", path.display());
        Self::open(path, description)
    }

    /// Opens the namespace of a process (`/proc/<pid>/ns/net`).
    pub fn from_pid(pid: u32) -> Result<Self> {
        let path = format!("/proc/{pid}/ns/net");
        let description = format!("of process {pid} ({path})");
        Self::open(path, description)
    }

    /// The description used in errors, e.g. `"pod-a" (/var/run/netns/pod-a)`.
    pub fn description(&self) -> &str {
        &self.description
    }

    /// Replaces the description, e.g. with the pod's name once it is known.
    #[must_use]
    pub fn described_as(mut self, description: impl Into<String>) -> Self {
        self.description = description.into();
        self
    }

    /// The namespace's identity, to tell whether two handles refer to the same namespace.
    pub fn id(&self) -> Result<NetNsId> {
        let stat = fstat(&self.fd).map_err(|errno| Error::Open {
            netns: self.description.clone(),
            source: errno.into(),
        })?;
        Ok(NetNsId {
            dev: stat.st_dev,
            ino: stat.st_ino,
        })
    }

    /// Runs `f` on a new thread that has entered this namespace, and returns its result.
    ///
    /// The calling thread never changes namespace. The call blocks until `f` returns, so from
    /// async code call it inside `spawn_blocking` unless `f` is quick (opening sockets and
    /// sending netlink requests are). A panic in `f` resumes on the caller.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        let fd: BorrowedFd<'_> = self.fd.as_fd();
        std::thread::scope(|scope| {
            let thread = std::thread::Builder::new()
                .name("netns".to_owned())
                .spawn_scoped(scope, move || {
                    setns(fd, CloneFlags::CLONE_NEWNET).map(|()| f())
                })
                .map_err(|source| Error::SpawnThread {
                    netns: self.description.clone(),
                    source,
                })?;
            match thread.join() {
                Ok(result) => result.map_err(|errno| Error::Enter {
                    netns: self.description.clone(),
                    source: errno.into(),
                }),
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }

    /// Opens a TCP listener on `addr` inside this namespace, set non-blocking so the caller can
    /// hand it to `tokio::net::TcpListener::from_std`.
    ///
    /// `SO_REUSEADDR` is set so a restarted ztunnel can bind again while old connections linger
    /// in TIME_WAIT. Binding `[::]` also accepts IPv4 (dual stack).
    pub fn tcp_listener(&self, addr: SocketAddr) -> Result<std::net::TcpListener> {
        let socket = self.new_socket(Domain::for_address(addr), "a listening socket")?;
        let bind_error = |source| Error::Bind {
            netns: self.description.clone(),
            addr,
            source,
        };
        socket.set_reuse_address(true).map_err(bind_error)?;
        if let SocketAddr::V6(v6) = addr {
            socket
                .set_only_v6(!v6.ip().is_unspecified())
                .map_err(bind_error)?;
        }
        socket.bind(&addr.into()).map_err(bind_error)?;
        socket.listen(LISTEN_BACKLOG).map_err(bind_error)?;
        socket.set_nonblocking(true).map_err(bind_error)?;
        Ok(socket.into())
    }

    /// Creates an unconnected TCP socket inside this namespace with `SO_MARK` set to `mark`, so
    /// the capture rules let its packets through (see [`super::CaptureConfig::mark`]).
    ///
    /// The socket is blocking; for tokio, set it non-blocking and use
    /// `tokio::net::TcpSocket::from_std_stream(socket.into())`.
    pub fn outbound_socket(&self, domain: Domain, mark: u32) -> Result<Socket> {
        self.run(|| marked_tcp_socket(domain, mark))?
            .map_err(|source| Error::Socket {
                netns: self.description.clone(),
                what: "a marked outbound socket (SO_MARK)",
                source,
            })
    }

    /// Whether an interface in this namespace carries `ip`.
    pub fn has_address(&self, ip: IpAddr) -> Result<bool> {
        self.run(|| interface_addresses().map(|addresses| addresses.contains(&ip)))?
            .map_err(|source| Error::ListAddresses {
                netns: self.description.clone(),
                source,
            })
    }

    fn new_socket(&self, domain: Domain, what: &'static str) -> Result<Socket> {
        self.run(|| Socket::new(domain, Type::STREAM, Some(Protocol::TCP)))?
            .map_err(|source| Error::Socket {
                netns: self.description.clone(),
                what,
                source,
            })
    }
}

/// Finds the network namespace in which an interface carries `ip`, by looking at the namespace
/// of every process in `/proc` (each namespace once). This is how a pod's namespace is found
/// on a node: the pod's sandbox process lives in it.
///
/// Namespaces without any process (e.g. a bare `ip netns add`) are not seen, and neither are
/// those of processes we may not inspect (ztunnel needs hostPID and CAP_SYS_PTRACE to see every
/// pod's); both are skipped, as are processes that exit during the scan. The host's own
/// namespace is searched too. Failing to enter a namespace is an error: it means ztunnel lacks
/// the privileges to search any.
pub fn find_netns_by_ip(ip: IpAddr) -> Result<Option<NetNs>> {
    let (found, denied) =
        visit_proc_namespaces(|_, netns| Ok(netns.has_address(ip)?.then_some(netns)))?;
    if found.is_none() && denied > 0 {
        tracing::debug!(
            %ip,
            denied,
            "no network namespace has this address; the namespaces of {denied} processes could \
             not be opened (permission denied)"
        );
    }
    Ok(found)
}

/// A network namespace seen through `/proc`: a process in it and its interfaces' addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcNamespace {
    /// One process in the namespace (the first found); `/proc/<pid>/ns/net` opens it while
    /// that process lives.
    pub pid: u32,
    pub id: NetNsId,
    pub addresses: Vec<IpAddr>,
}

/// Every network namespace that has a process in `/proc` (each once, the host's included) with
/// its addresses: one pass that indexes a node's pods by IP, where [`find_netns_by_ip`] would
/// pass over every namespace once per pod. Skips what [`find_netns_by_ip`] skips.
pub fn scan_proc_namespaces() -> Result<Vec<ProcNamespace>> {
    let mut found = Vec::new();
    visit_proc_namespaces(|pid, netns| {
        let addresses = netns
            .run(interface_addresses)?
            .map_err(|source| Error::ListAddresses {
                netns: netns.description().to_owned(),
                source,
            })?;
        found.push(ProcNamespace {
            pid,
            id: netns.id()?,
            addresses,
        });
        Ok(None::<()>)
    })?;
    Ok(found)
}

/// Calls `visit` with each network namespace of a process in `/proc`, once per namespace,
/// until it returns `Some`; also returns how many processes could not be opened (permission
/// denied). Processes that exit during the scan are skipped.
fn visit_proc_namespaces<T>(
    mut visit: impl FnMut(u32, NetNs) -> Result<Option<T>>,
) -> Result<(Option<T>, usize)> {
    let scan_error = |source| Error::Scan {
        path: "/proc".to_owned(),
        source,
    };
    let mut seen = HashSet::new();
    let mut denied = 0_usize;
    for entry in std::fs::read_dir("/proc").map_err(scan_error)? {
        let entry = entry.map_err(scan_error)?;
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let netns = match NetNs::from_pid(pid) {
            Ok(netns) => netns,
            Err(Error::Open { source, .. }) if source.kind() == io::ErrorKind::PermissionDenied => {
                denied += 1;
                continue;
            }
            // The process exited between listing and opening.
            Err(_) => continue,
        };
        if !seen.insert(netns.id()?) {
            continue;
        }
        if let Some(found) = visit(pid, netns)? {
            return Ok((Some(found), denied));
        }
    }
    Ok((None, denied))
}

/// Lists the addresses of every interface in the calling thread's namespace (RTM_GETADDR).
fn interface_addresses() -> io::Result<Vec<IpAddr>> {
    let socket = NetlinkSocket::open(netlink_sys::constants::NETLINK_ROUTE)?;
    let mut request =
        NetlinkMessage::from(RouteNetlinkMessage::GetAddress(AddressMessage::default()));
    request.header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    request.header.sequence_number = 1;
    socket.send(std::slice::from_mut(&mut request))?;

    let mut addresses = Vec::new();
    loop {
        for message in socket.recv::<RouteNetlinkMessage>()? {
            match message.payload {
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewAddress(address)) => {
                    addresses.extend(address.attributes.iter().filter_map(|attribute| {
                        match attribute {
                            AddressAttribute::Address(ip) | AddressAttribute::Local(ip) => {
                                Some(*ip)
                            }
                            _ => None,
                        }
                    }));
                }
                NetlinkPayload::Done(_) => return Ok(addresses),
                NetlinkPayload::Error(error) => return Err(error.to_io()),
                _ => {}
            }
        }
    }
}

/// A TCP socket in the calling thread's namespace with `SO_MARK` set, so the capture rules let
/// its packets through.
fn marked_tcp_socket(domain: Domain, mark: u32) -> io::Result<Socket> {
    let socket = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?;
    socket.set_mark(mark)?;
    Ok(socket)
}

type SocketRequest = (
    Domain,
    u32,
    tokio::sync::oneshot::Sender<io::Result<Socket>>,
);

/// Makes marked outbound sockets inside one namespace from a long-lived thread that entered it
/// once, so a connection made on a pod's behalf costs a channel round trip instead of a thread
/// (which [`NetNs::outbound_socket`] spawns each time, and which the virtual-cluster benchmark
/// showed limiting the connection rate). The thread ends when the factory is dropped.
#[derive(Debug)]
pub struct SocketFactory {
    requests: std::sync::mpsc::Sender<SocketRequest>,
    description: String,
}

impl NetNs {
    /// Starts a [`SocketFactory`] for this namespace.
    pub fn socket_factory(&self) -> Result<SocketFactory> {
        let fd = self.fd.try_clone().map_err(|source| Error::SpawnThread {
            netns: self.description.clone(),
            source,
        })?;
        let (requests, incoming) = std::sync::mpsc::channel::<SocketRequest>();
        let (entered_tx, entered_rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("netns-sockets".to_owned())
            .spawn(move || {
                let entered = setns(fd.as_fd(), CloneFlags::CLONE_NEWNET);
                let ok = entered.is_ok();
                let _ = entered_tx.send(entered);
                if !ok {
                    return;
                }
                for (domain, mark, reply) in incoming {
                    let _ = reply.send(marked_tcp_socket(domain, mark));
                }
            })
            .map_err(|source| Error::SpawnThread {
                netns: self.description.clone(),
                source,
            })?;
        match entered_rx.recv() {
            Ok(Ok(())) => Ok(SocketFactory {
                requests,
                description: self.description.clone(),
            }),
            Ok(Err(errno)) => Err(Error::Enter {
                netns: self.description.clone(),
                source: errno.into(),
            }),
            Err(_) => Err(Error::SpawnThread {
                netns: self.description.clone(),
                source: io::Error::other("socket thread ended before entering the namespace"),
            }),
        }
    }
}

impl SocketFactory {
    /// A TCP socket inside the namespace with `SO_MARK` set to `mark`.
    pub async fn outbound_socket(&self, domain: Domain, mark: u32) -> io::Result<Socket> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let gone = || {
            io::Error::other(format!(
                "the socket thread of {} has stopped",
                self.description
            ))
        };
        self.requests
            .send((domain, mark, reply))
            .map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }
}
