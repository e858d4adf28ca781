"""Two "hosts" on one machine for multi-node tests: network namespaces joined by a veth link,
each running its own sshd (keys made here) under its own host name. Torn down on exit, also when
the test fails.  ``local``: a path each host sees backed by a directory of its own (a node-local
disk, ``TwoHosts.disk``); everything else is shared.

Only the addresses given to the namespaces here (10.77.0.1, 10.77.0.2) are ever contacted.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time

ADDRS = ("10.77.0.1", "10.77.0.2")
IFNAME = "ted0"  # the same interface name in both namespaces, so GLOO_SOCKET_IFNAME works everywhere
HOSTNAMES = ("ted-node0", "ted-node1")


def netns_available() -> bool:
    return os.geteuid() == 0 and all(shutil.which(b) for b in ("ip", "sshd", "ssh", "ssh-keygen", "pdsh"))


def _sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=30)


class TwoHosts:
    def __init__(self, root: str, local: str | None = None):
        tag = str(os.getpid() % 100000)
        self.root = root
        self.local = local
        self.ns = (f"tedA{tag}", f"tedB{tag}")
        self.sshd: list[subprocess.Popen] = []
        self.key = os.path.join(root, "id_ed25519")

    def __enter__(self) -> TwoHosts:
        try:
            self._up()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _up(self) -> None:
        a, b = self.ns
        for ns in self.ns:
            _sh("ip", "netns", "add", ns)
            _sh("ip", "-n", ns, "link", "set", "lo", "up")
        va, vb = f"v{a}"[:15], f"v{b}"[:15]
        _sh("ip", "link", "add", va, "type", "veth", "peer", "name", vb)
        for ns, dev, addr in ((a, va, ADDRS[0]), (b, vb, ADDRS[1])):
            _sh("ip", "link", "set", dev, "netns", ns)
            _sh("ip", "-n", ns, "link", "set", dev, "name", IFNAME)
            _sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", IFNAME)
            _sh("ip", "-n", ns, "link", "set", IFNAME, "up")
        os.makedirs("/run/sshd", exist_ok=True)
        _sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", self.key)
        shutil.copy(self.key + ".pub", os.path.join(self.root, "authorized_keys"))
        for ns, addr in zip(self.ns, ADDRS):
            host_key = os.path.join(self.root, f"host_{ns}")
            _sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", host_key)
            config = os.path.join(self.root, f"sshd_{ns}.conf")
            with open(config, "w") as f:
                f.write(f"ListenAddress {addr}\nPort 22\nHostKey {host_key}\n"
                        f"AuthorizedKeysFile {self.root}/authorized_keys\nPermitRootLogin yes\n"
                        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
                        f"PidFile {self.root}/sshd_{ns}.pid\nAcceptEnv *\n")
            self.sshd.append(subprocess.Popen(["ip", "netns", "exec", ns, "unshare", "--uts", "sh", "-c",
                                               self._host_setup(ns) + 'exec "$@"', "sh", shutil.which("sshd"), "-D",
                                               "-f", config, "-E", os.path.join(self.root, f"sshd_{ns}.log")]))
        deadline = time.time() + 30
        for addr in ADDRS:
            while self.ssh(addr, "true").returncode != 0:
                if time.time() > deadline:
                    raise RuntimeError(f"sshd on {addr} did not come up")
                time.sleep(0.3)

    def disk(self, host: int) -> str:
        """The directory behind ``local`` on host ``host`` (0 or 1), as the test sees it."""
        return os.path.join(self.root, f"disk-{HOSTNAMES[host]}")

    def _host_setup(self, ns: str) -> str:
        """Shell commands run in the host's namespaces before its sshd: its name, its own ``local``
        (``ip netns exec`` gives each host a mount namespace of its own, so the mount stays there)."""
        host = self.ns.index(ns)
        setup = f"hostname {HOSTNAMES[host]} && "
        if self.local is not None:
            os.makedirs(self.local, exist_ok=True)
            os.makedirs(self.disk(host), exist_ok=True)
            setup += f"mount --bind {self.disk(host)} {self.local} && "
        return setup

    def ssh_options(self) -> list[str]:
        return ["-i", self.key, "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                "-o", "LogLevel=ERROR", "-o", "BatchMode=yes"]

    def ssh(self, addr: str, command: str) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", self.ns[0], "ssh", *self.ssh_options(), f"root@{addr}",
                               command], capture_output=True, text=True, timeout=30)

    def __exit__(self, *exc) -> None:
        for p in self.sshd:
            p.terminate()
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        for ns in self.ns:
            # anything still running in the namespace (ranks of a failed run) goes with it
            pids = _sh("ip", "netns", "pids", ns, check=False).stdout.split()
            for pid in pids:
                subprocess.run(["kill", "-9", pid], capture_output=True)
            _sh("ip", "netns", "del", ns, check=False)
