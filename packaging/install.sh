#!/bin/sh
# Install the mount helper and the systemd user unit of vaultfs.
#
#   packaging/install.sh [--vaultfs PATH] [--prefix DIR] [--sbindir DIR] [--unitdir DIR]
#
# Defaults: the helper goes to /sbin/mount.fuse.vaultfs (where mount(8) looks for it), the unit
# to /usr/lib/systemd/user/vaultfs@.service. --prefix DIR puts them in DIR/sbin and
# DIR/lib/systemd/user instead (for a package build root, or a user's own systemd directory with
# --unitdir ~/.config/systemd/user). Both files name the vaultfs command by absolute path, since
# neither mount(8) at boot nor systemd searches a virtual environment: the path is --vaultfs, or
# the vaultfs found on PATH.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
vaultfs= prefix= sbindir= unitdir=
while [ $# -gt 0 ]; do
    case $1 in
        --vaultfs) vaultfs=$2; shift ;;
        --prefix) prefix=$2; shift ;;
        --sbindir) sbindir=$2; shift ;;
        --unitdir) unitdir=$2; shift ;;
        -h|--help) sed -n '2,11s/^# \{0,1\}//p' "$0"; exit 0 ;;
        *) echo "install.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

if [ -z "$vaultfs" ]; then
    vaultfs=$(command -v vaultfs) || {
        echo "install.sh: vaultfs is not on PATH; install it first or give --vaultfs PATH" >&2
        exit 1
    }
fi
case $vaultfs in
    /*) ;;
    *) vaultfs=$(cd "$(dirname "$vaultfs")" && pwd)/$(basename "$vaultfs") ;;
esac
"$vaultfs" --version >/dev/null 2>&1 || {
    echo "install.sh: $vaultfs does not run (is it the vaultfs command?)" >&2
    exit 1
}

if [ -n "$prefix" ]; then
    : "${sbindir:=$prefix/sbin}" "${unitdir:=$prefix/lib/systemd/user}"
else
    : "${sbindir:=/sbin}" "${unitdir:=/usr/lib/systemd/user}"
fi

# Write to a temporary name, then rename: a mount running the old helper never sees half a file.
put() {  # put SOURCE DEST MODE
    mkdir -p "$(dirname "$2")"
    sed "s|/usr/local/bin/vaultfs|$vaultfs|g" "$1" > "$2.tmp.$$"
    chmod "$3" "$2.tmp.$$"
    mv -f "$2.tmp.$$" "$2"
    echo "installed $2"
}
put "$here/mount.fuse.vaultfs" "$sbindir/mount.fuse.vaultfs" 755
put "$here/systemd/vaultfs@.service" "$unitdir/vaultfs@.service" 644
