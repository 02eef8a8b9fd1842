"""The cluster's DNS records for the CI cluster's stand-in of CoreDNS, from the API, for dnsmasq.

    python3 .ci/cluster_dns.py <hosts file> <dnsmasq pid file> [<kubectl>]

Once a second it reads the Services and Endpoints (kubectl get -o json) and writes the records CoreDNS would
answer for them, as a hosts file: `<service>.<namespace>.svc.cluster.local` is the Service's ClusterIP, or for a
headless Service the address of each ready endpoint (one line each: dnsmasq answers with all of them). When the
records change it asks dnsmasq to read them again (SIGHUP). It runs until it is stopped.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

DOMAIN = "svc.cluster.local"


def records(kubectl: str) -> list[str]:
    listed = subprocess.run(
        [kubectl, "get", "services,endpoints", "--all-namespaces", "-o", "json"],
        capture_output=True,
        text=True,
        timeout=20,
        check=True,
    )
    items = json.loads(listed.stdout)["items"]
    endpoints = {(i["metadata"]["namespace"], i["metadata"]["name"]): i for i in items if i["kind"] == "Endpoints"}
    lines = []
    for service in (i for i in items if i["kind"] == "Service"):
        namespace, name = service["metadata"]["namespace"], service["metadata"]["name"]
        host = f"{name}.{namespace}.{DOMAIN}"
        cluster_ip = service["spec"].get("clusterIP")
        if cluster_ip and cluster_ip != "None":
            lines.append(f"{cluster_ip} {host}")
            continue
        subsets = endpoints.get((namespace, name), {}).get("subsets") or []
        lines += sorted({f"{a['ip']} {host}" for subset in subsets for a in subset.get("addresses", [])})
    return sorted(lines)


def main(hosts: Path, pid_file: Path, kubectl: str = "kubectl") -> None:
    written = None
    while True:
        try:
            current = records(kubectl)
        except (subprocess.SubprocessError, json.JSONDecodeError, KeyError) as error:
            print(f"cluster_dns: could not read the Services: {error}", file=sys.stderr, flush=True)
            time.sleep(1)
            continue
        if current != written:
            hosts.write_text("".join(line + "\n" for line in current))
            written = current
            if pid_file.is_file():
                os.kill(int(pid_file.read_text()), signal.SIGHUP)
            print(f"cluster_dns: {len(current)} records", file=sys.stderr, flush=True)
        time.sleep(1)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), *sys.argv[3:4])
