#!/usr/bin/env bash
# Provisions this machine as a software-tee device (docs/SECURITY.md, "software-tee"). Run as root, once per
# machine and again after every worker update:
#   - creates the system user that owns the device's credentials (default secureinfer-tee), if missing;
#   - creates its device directory, <home>/device (owner that user, 0711: others may open quoting.pub by name
#     but list nothing), with the device secret and the quoting key (0600) and quoting.pub (0644, the public
#     quoting key in hex, what `secureinfer device-key` prints and a keyserver pins);
#   - installs the worker setuid and setgid to that user, with CAP_IPC_LOCK (for memfd_secret; dropped once its
#     secret memory is reserved) when setcap is available.
# Hosts then run with SI_WORKER=<install dir>/secureinfer-worker, or with the CLI installed next to the worker.
#
#   scripts/provision-software-tee.sh [--user NAME] [--home DIR] [--worker PATH] [--install-dir DIR]
set -euo pipefail

user=secureinfer-tee
home=/var/lib/secureinfer-tee
worker="$(dirname "$0")/../build/secureinfer-worker"
install_dir=/usr/local/libexec/secureinfer

die() {
  echo "provision-software-tee: $*" >&2
  exit 1
}
while [ $# -gt 0 ]; do
  case "$1" in
    --user) user=${2:?--user needs a name}; shift 2 ;;
    --home) home=${2:?--home needs a directory}; shift 2 ;;
    --worker) worker=${2:?--worker needs a path}; shift 2 ;;
    --install-dir) install_dir=${2:?--install-dir needs a directory}; shift 2 ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) die "unknown argument: $1" ;;
  esac
done
[ "$(id -u)" -eq 0 ] || die "must run as root (it creates a user and installs a setuid program)"
[ -x "$worker" ] || die "no worker executable at $worker (build the secureinfer-worker target or pass --worker)"
case "$home" in /*) ;; *) die "--home must be an absolute path" ;; esac
case "$install_dir" in /*) ;; *) die "--install-dir must be an absolute path" ;; esac

# useradd fails rather than waits while another process holds the password file's lock: retry a few times.
for attempt in 1 2 3 4 5 6 7 8 9 10; do
  getent passwd "$user" >/dev/null && break
  useradd --system --user-group --home-dir "$home" --no-create-home --shell /usr/sbin/nologin "$user" && break
  sleep 1
done
getent passwd "$user" >/dev/null || die "cannot create the user $user"
# An existing user keeps its home: the worker finds the device there (<home>/device).
home=$(getent passwd "$user" | cut -d: -f6)
group=$(id -gn "$user")

# Root owns the home and the install directory: the user itself cannot replace its worker or move its device.
install -d -o root -g root -m 0755 "$home" "$install_dir"
install -d -o "$user" -g "$group" -m 0711 "$home/device"
# Written to a temporary name and renamed: a running worker keeps its old executable.
tmp="$install_dir/.secureinfer-worker.new"
install -o "$user" -g "$group" -m 0755 "$worker" "$tmp"
chmod 6755 "$tmp"
if command -v setcap >/dev/null; then
  setcap cap_ipc_lock=ep "$tmp"
else
  echo "provision-software-tee: setcap not found (Debian: libcap2-bin): the worker gets memfd_secret only" \
       "where its users' locked-memory limit (ulimit -l) covers its secret arena" >&2
fi
mv -f "$tmp" "$install_dir/secureinfer-worker"

# The device files, created by the user that owns them (existing ones are kept).
pub=$(setpriv --reuid="$user" --regid="$group" --clear-groups \
        "$install_dir/secureinfer-worker" --provision-device="$home/device")
echo "user:        $user"
echo "device:      $home/device"
echo "worker:      $install_dir/secureinfer-worker (setuid/setgid $user)"
echo "quoting key: $pub"
