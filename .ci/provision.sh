# What only CI needs from the system, sourced by .ci/run: a Docker engine with the compose and buildx plugins,
# the tools the container tests use (mmdebstrap for a stand-in base image), emulation of arm64 for the arm64 images,
# and chromium for the page test. `make test` never installs system software; where these are missing it skips the
# tests that need them and says why.
#
# Everything started here is stopped again on exit (the trap below), whatever the tests did.

ci_say() { printf 'ci: %s\n' "$*" >&2; }

# Something CI should provide cannot be had here. Under CI=true that stops the run, saying why; run by hand on
# another machine, the tests that need it skip and say why.
ci_lacks() {
  if [ "${CI:-}" = true ]; then
    ci_say "CI cannot run everything here: $*"
    return 1
  fi
  ci_say "$*"
}

# One step of the provisioning, with its start and its time in the log: a reader of a slow run sees which step it was.
ci_step() {
  local started=$SECONDS
  ci_say "$1: started at $(date +%T)"
  "$@"
  ci_say "$1: done in $((SECONDS - started)) s"
}

ci_cleanups=()
ci_cleanup() {
  local i
  for ((i = ${#ci_cleanups[@]} - 1; i >= 0; i--)); do eval "${ci_cleanups[i]}" || true; done
}
trap ci_cleanup EXIT

ci_can_apt() { [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; }

ci_apt_install() {
  local missing=() package
  for package in "$@"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q 'install ok installed' || missing+=("$package")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  ci_say "installing ${missing[*]} (apt)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null \
    || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null; }
}

# The URI of the Debian archive this machine's apt sources already name (deb822 or one-line format).
ci_debian_mirror() {
  local files=(/etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources)
  local existing=() file
  for file in "${files[@]}"; do [ -f "$file" ] && existing+=("$file"); done
  [ ${#existing[@]} -gt 0 ] || return 0
  awk '$1 == "URIs:" || $1 == "deb" {
         for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\/.*\/debian\/?$/) { print $i; exit }
       }' "${existing[@]}"
}

# Debian 13's packages named, downloaded into the folder given, with a private apt state so the system's sources
# and lists stay as they are: ci_debian13_download FOLDER PACKAGE...
ci_debian13_download() {
  local folder=$1 mirror work
  shift
  mirror=$(ci_debian_mirror)
  [ -n "$mirror" ] || { ci_say "no Debian mirror in the apt sources: cannot fetch $*"; return 1; }
  work=$(mktemp -d)
  mkdir -p "$work/lists/partial" "$work/cache/archives/partial" "$folder"
  echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror trixie main" >"$work/sources.list"
  local apt_private=(-o APT::Sandbox::User=root -o "Dir::Etc::SourceList=$work/sources.list" -o Dir::Etc::SourceParts=- \
    -o "Dir::State::Lists=$work/lists" -o "Dir::Cache=$work/cache" -o Dir::State::Status=/dev/null)
  apt-get "${apt_private[@]}" update -q >/dev/null
  (cd "$folder" && apt-get "${apt_private[@]}" download "$@" >/dev/null)
  rm -rf "$work"
}

# Compose v2 and buildx are not in Debian 12: take the single plugin binary out of Debian 13's package.
ci_docker_plugins() {
  local need=() pkg work
  docker compose version >/dev/null 2>&1 || need+=(docker-compose)
  docker buildx version >/dev/null 2>&1 || need+=(docker-buildx)
  [ ${#need[@]} -eq 0 ] && return 0
  work=$(mktemp -d)
  ci_say "fetching ${need[*]} (the plugin binaries of Debian 13's packages)"
  ci_debian13_download "$work/debs" "${need[@]}"
  mkdir -p "$DOCKER_CONFIG/cli-plugins"
  for pkg in "$work"/debs/*.deb; do
    dpkg-deb -x "$pkg" "$work/root"
  done
  cp "$work"/root/usr/libexec/docker/cli-plugins/docker-* "$DOCKER_CONFIG/cli-plugins/"
  rm -rf "$work"
  docker compose version >&2 && docker buildx version >&2
}

ci_docker_engine() {
  if timeout 20 docker info >/dev/null 2>&1; then
    ci_say "a Docker engine answers: the container tests use it"
  elif ! ci_can_apt; then
    ci_lacks "no Docker engine, and no root with apt to install one: the container tests will skip"
    return
  else
    command -v dockerd >/dev/null 2>&1 || ci_apt_install docker.io
    local log
    log=$(mktemp)
    ci_say "starting dockerd (log: $log)"
    dockerd >"$log" 2>&1 &
    local pid=$!
    ci_cleanups+=("ci_stop_dockerd $pid $log")
    local waited=0
    until timeout 10 docker info >/dev/null 2>&1; do
      if ! kill -0 "$pid" 2>/dev/null || [ $waited -ge 60 ]; then
        ci_say "dockerd did not come up:"; tail -n 30 "$log" >&2; return 1
      fi
      sleep 1; waited=$((waited + 1))
    done
    ci_say "dockerd answers after ${waited} s"
  fi
  # Here, an engine is part of the machine: the container tests must run, and fail rather than skip, whatever of
  # the rest (plugins, mmdebstrap) cannot be installed below.
  export ZOOMCAMP_REQUIRE_DOCKER=1
  # Plugins in a private CLI config, so nothing in the user's ~/.docker changes.
  export DOCKER_CONFIG
  DOCKER_CONFIG=$(mktemp -d)
  [ -f "$HOME/.docker/config.json" ] && cp "$HOME/.docker/config.json" "$DOCKER_CONFIG/"
  [ -d "$HOME/.docker/cli-plugins" ] && cp -r "$HOME/.docker/cli-plugins" "$DOCKER_CONFIG/"
  ci_cleanups+=("rm -rf $DOCKER_CONFIG")
  if ! ci_can_apt; then
    ci_say "not root with apt: using the compose and buildx plugins as installed"
    return 0
  fi
  ci_docker_plugins
  # The tests make a stand-in Python base from Debian packages when the official one cannot be pulled.
  command -v mmdebstrap >/dev/null 2>&1 || ci_apt_install mmdebstrap
}

ci_stop_dockerd() {
  local pid=$1 log=$2 waited=0
  kill -TERM "$pid" 2>/dev/null || return 0
  while kill -0 "$pid" 2>/dev/null && [ $waited -lt 30 ]; do sleep 1; waited=$((waited + 1)); done
  kill -KILL "$pid" 2>/dev/null || true
  ci_say "dockerd stopped"
  rm -f "$log"
}

# Debian's chromium for the page test (Playwright drives it; its own browser downloads are never used).
ci_browser() {
  if ! command -v chromium >/dev/null 2>&1; then
    if ! ci_can_apt; then
      ci_lacks "no chromium, and no root with apt to install it: the browser test will skip"
      return
    fi
    ci_apt_install chromium
  fi
  ci_say "$(chromium --version 2>/dev/null | head -n 1)"
  export ZOOMCAMP_REQUIRE_BROWSER=1
}

# arm64 under emulation: qemu-aarch64 registered in binfmt_misc with the F flag (the interpreter is opened at
# registration, so the containers need nothing of it inside), and arch-test lets mmdebstrap make an arm64 root
# filesystem. Then arm64 images build and run on this x86-64 machine. Debian 12's qemu (7.2) crashes LiteRT's arm64
# interpreter as it is created (SIGSEGV, whatever the CPU model); Debian 13's (10.0) runs it. So while CI runs, the
# static qemu-aarch64 of Debian 13's qemu-user, kept in $ZOOMCAMP_CACHE, is registered in place of Debian 12's.
ci_arm64() {
  local entry=/proc/sys/fs/binfmt_misc/qemu-aarch64
  if ci_can_apt; then
    ci_apt_install qemu-user-static binfmt-support arch-test mmdebstrap
    [ -e /proc/sys/fs/binfmt_misc/register ] || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
    [ -e "$entry" ] || update-binfmts --enable qemu-aarch64
    ci_qemu_from_debian13 "$entry"
  fi
  if [ ! -e "$entry" ]; then
    ci_lacks "qemu-aarch64 is not registered in binfmt_misc, and there is no root with apt to do it: the arm64 tests will skip"
    return
  fi
  if ! head -n 1 "$entry" | grep -qx enabled || ! grep -q '^flags:.*F' "$entry"; then
    ci_say "qemu-aarch64 is registered but not enabled with the F flag:"; cat "$entry" >&2; return 1
  fi
  local interpreter
  interpreter=$(awk '$1 == "interpreter" {print $2}' "$entry")
  ci_say "arm64 under emulation: $interpreter ($("$interpreter" --version | head -n 1)), $(grep '^flags' "$entry")"
  # Here, emulation is part of the machine: the arm64 tests must run, and fail rather than skip.
  export ZOOMCAMP_REQUIRE_ARM64=1
}

ci_qemu_from_debian13() {
  local entry=$1 qemu=${ZOOMCAMP_CACHE:-/var/cache/zoomcamp-10}/qemu-debian13/qemu-aarch64
  if [ ! -x "$qemu" ]; then
    local work
    work=$(mktemp -d)
    ci_say "fetching qemu-user (Debian 13's) for its qemu-aarch64"
    ci_debian13_download "$work/debs" qemu-user
    dpkg-deb -x "$work"/debs/qemu-user_*.deb "$work/root"
    mkdir -p "$(dirname "$qemu")"
    cp "$work/root/usr/bin/qemu-aarch64" "$qemu"
    rm -rf "$work"
  fi
  local magic mask
  magic=$(awk '$1 == "magic" {print $2}' "$entry" | sed 's/../\\x&/g')
  mask=$(awk '$1 == "mask" {print $2}' "$entry" | sed 's/../\\x&/g')
  echo -1 >"$entry"
  printf ':qemu-aarch64:M::%s:%s:%s:PF' "$magic" "$mask" "$qemu" >/proc/sys/fs/binfmt_misc/register
  ci_cleanups+=("ci_qemu_restore $entry")
}

# Debian 12's qemu-aarch64 registered again, as before the run.
ci_qemu_restore() {
  echo -1 >"$1" 2>/dev/null
  update-binfmts --enable qemu-aarch64 >/dev/null 2>&1
}

# The clothing photos beside the repository (../shared/data), for the parity checks against keras-image-helper.
ci_dataset() {
  local dataset=${CLOTHING_DATASET:-../shared/data/clothing-dataset-small}
  if [ -d "$dataset/test" ]; then
    ci_say "the clothing photos are at $dataset"
    export ZOOMCAMP_REQUIRE_DATASET=1
  else
    ci_lacks "no clothing photos at $dataset: the tests that compare on them will skip"
  fi
}

# An IPv6 loopback, for the test that fetches over it.
ci_openssl() {
  command -v openssl >/dev/null 2>&1 || ci_apt_install openssl
  if command -v openssl >/dev/null 2>&1; then
    ci_say "openssl: $(openssl version)"
    export ZOOMCAMP_REQUIRE_OPENSSL=1
  else
    ci_lacks "no openssl command: the TLS tests, which make their certificates with it, will skip"
  fi
}

ci_ipv6() {
  if python3 -c 'import socket; socket.socket(socket.AF_INET6).bind(("::1", 0))' 2>/dev/null; then
    ci_say "IPv6 loopback: yes"
    export ZOOMCAMP_REQUIRE_IPV6=1
  else
    ci_lacks "no IPv6 loopback (::1): the test that fetches over it will skip"
  fi
}
