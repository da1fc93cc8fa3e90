//! libvirt end to end (docs/libvirt.md): TCG domains made from that page's XML boot the test
//! guest on vhost-packet, in both socket roles, pass ping and TCP both ways, and come back over
//! a new connection after `virsh destroy` and `virsh start`. Needs root and Debian's
//! libvirt-daemon-system and libvirt-clients; under CI=true missing ones fail the test.
//!
//! There is no systemd here: the test starts virtlogd and libvirtd itself when they are not
//! running, and ends only those. libvirt's QEMU runs in the root network namespace, which is
//! fine: it only talks to vhost-packet's UNIX socket; vhost-packet's interface is in a test
//! namespace as everywhere else.
//!
//! Figures (RTT, Gbit/s) are printed; run with `--nocapture` to see them. Nothing here asserts
//! on timing.

mod common;

use std::fs::File;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::daemon::Daemon;
use common::guest::{
    one_guest_at_a_time, ping_both_ways, require_guest, tcp_both_ways, Guest, GuestNet, GUEST_IP,
    GUEST_IP6, GUEST_MAC,
};
use common::netns::require_root_and_tools;

const URI: &str = "qemu:///system";
/// The user Debian's libvirt runs QEMU as (qemu.conf `user`) and its group `kvm`.
const QEMU_OWNER: &str = "libvirt-qemu:kvm";
const START_TIMEOUT: Duration = Duration::from_secs(60);

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn virsh(args: &[&str]) -> Output {
    Command::new("virsh")
        .args(["-c", URI])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run virsh {args:?}: {e}"))
}

fn virsh_ok(args: &[&str]) -> String {
    let out = virsh(args);
    assert!(
        out.status.success(),
        "virsh {args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// True if the libvirt tests can run (root, libvirt's programs, the booted-guest tools).
fn require_libvirt() -> bool {
    require_root_and_tools(&["virsh", "libvirtd", "virtlogd", "chown"]) && require_guest()
}

/// A daemon this test started, with its stderr log.
struct Started {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

/// virtlogd and libvirtd, each started (in the foreground, as our child) only if its socket
/// does not answer; on drop, ended by PID, only those started here.
struct LibvirtDaemons {
    started: Vec<Started>,
}

impl LibvirtDaemons {
    fn ensure() -> LibvirtDaemons {
        let mut daemons = LibvirtDaemons {
            started: Vec::new(),
        };
        // virtlogd first: libvirtd hands each QEMU's stdout and stderr to it.
        for (name, socket) in [
            ("virtlogd", "/run/libvirt/virtlogd-sock"),
            ("libvirtd", "/run/libvirt/libvirt-sock"),
        ] {
            if UnixStream::connect(socket).is_ok() {
                continue;
            }
            let log = std::env::temp_dir().join(format!("vp-{name}-{}.log", std::process::id()));
            let child = Command::new(name)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(File::create(&log).expect("create the daemon log"))
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
            daemons.started.push(Started { name, child, log });
            let started = daemons.started.last_mut().unwrap();
            let deadline = Instant::now() + Duration::from_secs(30);
            while UnixStream::connect(socket).is_err() {
                let exited = started.child.try_wait().ok().flatten();
                if exited.is_some() || Instant::now() > deadline {
                    panic!(
                        "{name} did not answer on {socket} ({}):\n{}",
                        exited.map_or("timed out".into(), |s| s.to_string()),
                        std::fs::read_to_string(&started.log).unwrap_or_default()
                    );
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        daemons
    }
}

impl Drop for LibvirtDaemons {
    fn drop(&mut self) {
        // libvirtd before virtlogd, the reverse of starting them.
        while let Some(mut d) = self.started.pop() {
            if matches!(d.child.try_wait(), Ok(None)) {
                // SAFETY: kill(2) on the PID of our unreaped child.
                unsafe { libc::kill(d.child.id() as libc::pid_t, libc::SIGTERM) };
                let deadline = Instant::now() + Duration::from_secs(10);
                while Instant::now() < deadline && matches!(d.child.try_wait(), Ok(None)) {
                    std::thread::sleep(Duration::from_millis(50));
                }
                let _ = d.child.kill();
            }
            let _ = d.child.wait();
            if std::thread::panicking() {
                eprintln!(
                    "{} log:\n{}",
                    d.name,
                    std::fs::read_to_string(&d.log).unwrap_or_default()
                );
            }
            let _ = std::fs::remove_file(&d.log);
        }
    }
}

/// docs/libvirt.md's ```xml blocks.
fn doc_xml_blocks() -> Vec<String> {
    let path = repo().join("docs/libvirt.md");
    let doc =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    doc.split("```xml\n")
        .skip(1)
        .map(|b| b.split("```").next().unwrap_or_default().to_owned())
        .collect()
}

/// The first `open ... close` element in `text`.
fn element<'a>(text: &'a str, open: &str, close: &str) -> Option<&'a str> {
    let at = text.find(open)?;
    let len = text[at..].find(close)? + close.len();
    Some(&text[at..at + len])
}

/// An element of docs/libvirt.md: the first `open ... close` in a block that `pick` accepts.
fn doc_element(open: &str, close: &str, pick: impl Fn(&str) -> bool) -> String {
    doc_xml_blocks()
        .iter()
        .filter_map(|b| element(b, open, close))
        .find(|e| pick(e))
        .unwrap_or_else(|| panic!("docs/libvirt.md has no {open} ... {close} block as expected"))
        .to_owned()
}

/// The page's complete domain.
fn doc_domain() -> String {
    doc_element("<domain type='kvm'>", "</domain>", |_| true)
}

/// The page's `<interface>` for libvirt's `mode` (`client` or `server`), with its socket
/// path replaced by `socket`.
fn doc_interface(mode: &str, socket: &Path) -> String {
    let mode_attr = format!("mode='{mode}'");
    let iface = doc_element("<interface type='vhostuser'>", "</interface>", |e| {
        e.contains(&mode_attr)
    });
    let at = iface.find("path='").expect("the interface names a path") + "path='".len();
    let len = iface[at..].find('\'').expect("a quoted path");
    format!("{}{}{}", &iface[..at], socket.display(), &iface[at + len..])
}

/// A libvirt domain of this test: its directory (a copy of the guest image that libvirt's
/// QEMU may read, the console socket), destroyed, undefined and removed on drop.
struct Domain {
    name: String,
    dir: PathBuf,
}

impl Domain {
    /// The directory for domain `vp-libvirt-<role>-<pid>`.
    fn prepare(role: &str) -> Domain {
        let name = format!("vp-libvirt-{role}-{}", std::process::id());
        let dir = std::env::temp_dir().join(&name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        let domain = Domain { name, dir };
        set_mode(&domain.dir, 0o755);
        domain
    }

    /// Copies the guest's kernel and initramfs into the directory, readable by all: libvirt
    /// gives them to QEMU's user while the domain runs and back to root afterwards, which the
    /// repository's cache should not see.
    fn with_guest_image(self) -> Domain {
        let guest = repo().join("qemu/.cache/guest");
        for file in ["vmlinux", "initramfs.gz"] {
            let to = self.dir.join(file);
            std::fs::copy(guest.join(file), &to)
                .unwrap_or_else(|e| panic!("copy {file} to {}: {e}", to.display()));
            set_mode(&to, 0o644);
        }
        self
    }

    fn console(&self) -> PathBuf {
        self.dir.join("console.sock")
    }

    fn qemu_log(&self) -> PathBuf {
        PathBuf::from(format!("/var/log/libvirt/qemu/{}.log", self.name))
    }

    /// The test domain: the page's `<memoryBacking>`, `interface` and `<qemu:override>`
    /// (TCG) around a direct kernel boot of the test guest, whose console is a UNIX socket
    /// libvirt listens on. The command line is qemu/boot.sh's (qemu/guest-init.sh reads it).
    fn xml(&self, interface: &str) -> String {
        let memory = doc_element("<memoryBacking>", "</memoryBacking>", |_| true);
        let tcg = doc_element("<qemu:override>", "</qemu:override>", |_| true);
        let console = self.console();
        let (name, dir, console) = (&self.name, self.dir.display(), console.display());
        format!(
            "<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{name}</name>
  <memory unit='MiB'>512</memory>
  <vcpu>1</vcpu>
  {memory}
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{dir}/vmlinux</kernel>
    <initrd>{dir}/initramfs.gz</initrd>
    <cmdline>console=ttyS0 loglevel=3 panic=-1 vp.addr={GUEST_IP}/24 vp.addr6={GUEST_IP6}/64</cmdline>
  </os>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    {interface}
    <serial type='unix'>
      <source mode='bind' path='{console}'/>
      <target port='0'/>
    </serial>
    <memballoon model='none'/>
  </devices>
  {tcg}
</domain>
"
        )
    }

    /// `virsh define` from `xml` (kept in the domain's directory).
    fn define(&self, xml: &str) {
        let path = self.dir.join("domain.xml");
        std::fs::write(&path, xml).expect("write the domain XML");
        virsh_ok(&["define", path.to_str().unwrap()]);
    }

    /// `virsh start`, with the console connected while it runs: libvirt makes the console's
    /// listening socket before QEMU starts, and QEMU accepts while still paused, so the boot
    /// markers are all seen. Waits for the guest's shell.
    fn start(&self) -> Guest {
        let console = self.console();
        let _ = std::fs::remove_file(&console);
        let mut start = Command::new("virsh")
            .args(["-c", URI, "start", &self.name])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn virsh start");
        // virsh start returns once QEMU runs, which waits for the vhost-user connection: a
        // QEMU that cannot connect would keep it waiting, so it is bounded too.
        let deadline = Instant::now() + START_TIMEOUT;
        let mut stream = None;
        let failure = loop {
            if stream.is_none() {
                stream = UnixStream::connect(&console).ok();
            }
            match start.try_wait() {
                Ok(Some(status)) if status.success() && stream.is_some() => break None,
                Ok(Some(status)) if status.success() => break Some("the console did not answer"),
                Ok(Some(_)) => break Some("virsh start failed"),
                _ if Instant::now() > deadline => {
                    let _ = start.kill();
                    break Some("virsh start timed out");
                }
                _ => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        let out = start.wait_with_output().expect("wait for virsh start");
        if let Some(why) = failure {
            let log = std::fs::read_to_string(self.qemu_log()).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(5).collect();
            panic!(
                "starting domain {}: {why} ({}): {}\nQEMU log, last lines:\n{}",
                self.name,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        let stream = stream.expect("connected");
        Guest::attach_console(stream, self.qemu_log())
    }

    fn destroy(&self) {
        virsh_ok(&["destroy", &self.name]);
    }
}

impl Drop for Domain {
    fn drop(&mut self) {
        // Either may fail (never started, already destroyed): the point is that neither stays.
        let _ = virsh(&["destroy", &self.name]);
        let _ = virsh(&["undefine", &self.name]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn set_mode(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {mode:o} {}: {e}", path.display()));
}

/// Boots `domain` on `net`'s vhost-packet, ping and TCP both ways; `virsh destroy`, `virsh
/// start`, ping both ways over the new connection.
fn boot_traffic_restart(domain: &Domain, net: &GuestNet, role: &str) {
    let mut guest = domain.start();
    let rtt = ping_both_ways(net, &mut guest);
    let (up, down) = tcp_both_ways(&mut guest);
    eprintln!(
        "libvirt {role}: eth0 up {:.2} s after boot; {rtt}; TCP guest->peer {up:.2} Gbit/s, \
         peer->guest {down:.2} Gbit/s",
        guest.link_up_secs
    );
    drop(guest);
    domain.destroy();
    let mut guest = domain.start();
    net.daemon()
        .wait_for_log_count("frontend connected", 2, START_TIMEOUT);
    let rtt = ping_both_ways(net, &mut guest);
    eprintln!("libvirt {role}, after virsh destroy and start: {rtt}");
}

/// libvirt `mode='client'`: vhost-packet listens (socket group kvm, mode 0660, as the page
/// says), libvirt's QEMU connects; the page's complete domain is accepted as written.
#[test]
fn libvirt_client_mode_domain_passes_traffic_and_restarts() {
    if !require_libvirt() {
        return;
    }
    let _one = one_guest_at_a_time();
    let _libvirt = LibvirtDaemons::ensure();

    let pasted = Domain::prepare("pasted");
    // As written but for the domain type: the host may have no KVM.
    let xml = doc_domain()
        .replace("<domain type='kvm'>", "<domain type='qemu'>")
        .replace("<name>vm1</name>", &format!("<name>{}</name>", pasted.name));
    pasted.define(&xml);
    drop(pasted);

    let net = GuestNet::new(None, &["--socket-group", "kvm", "--socket-mode", "0660"]);
    let domain = Domain::prepare("client").with_guest_image();
    domain.define(&domain.xml(&doc_interface("client", &net.socket)));
    boot_traffic_restart(&domain, &net, "mode='client'");
}

/// libvirt `mode='server'`: libvirt's QEMU listens in a directory its user owns, vhost-packet
/// connects (`--client`) and reconnects after the restart; libvirt refuses `<reconnect>` in
/// this role, as the page says.
#[test]
fn libvirt_server_mode_domain_passes_traffic_and_restarts() {
    if !require_libvirt() {
        return;
    }
    let _one = one_guest_at_a_time();
    let _libvirt = LibvirtDaemons::ensure();

    let mut net = GuestNet::new(None, &[]);
    let domain = Domain::prepare("server").with_guest_image();
    let sockets = domain.dir.join("vhost-user");
    std::fs::create_dir(&sockets).expect("create the socket directory");
    set_mode(&sockets, 0o770);
    let out = Command::new("chown")
        .arg(QEMU_OWNER)
        .arg(&sockets)
        .output()
        .expect("run chown");
    assert!(out.status.success(), "chown {QEMU_OWNER}: {out:?}");
    // QEMU listens in this role: vhost-packet connects instead of listening.
    net.daemon = None;
    net.socket = sockets.join("eth.sock");
    net.daemon = Some(Daemon::start_client(
        &net.host,
        "vh0",
        &net.socket,
        &["--mac", GUEST_MAC],
    ));
    let interface = doc_interface("server", &net.socket);

    let refused = interface.replace(
        "mode='server'/>",
        "mode='server'>\n<reconnect enabled='yes' timeout='1'/>\n</source>",
    );
    assert_ne!(
        refused, interface,
        "the server interface ends its <source/>"
    );
    std::fs::write(domain.dir.join("refused.xml"), domain.xml(&refused)).unwrap();
    let out = virsh(&["define", domain.dir.join("refused.xml").to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains(
                "'reconnect' attribute unsupported 'server' mode for <interface type='vhostuser'>"
            ),
        "libvirt was expected to refuse <reconnect> with mode='server' ({}): {err}",
        out.status
    );

    domain.define(&domain.xml(&interface));
    boot_traffic_restart(&domain, &net, "mode='server'");
}
