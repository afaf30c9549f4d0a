#!/usr/bin/env bash
# Build docker/Dockerfile on a machine that reaches no container registry, and
# prove the image's entry point runs.
#
#   sudo docker/build-check.sh            (from anywhere; needs root, podman, debootstrap)
#
# 1. A Debian bookworm root made with debootstrap from a Debian package mirror
#    (DEBIAN_MIRROR, default deb.debian.org), with Python 3.11, venv and pip,
#    stands in for python:3.11-slim-bookworm; `podman import` makes it the
#    base image (cached in BUILD_CHECK_DIR, default /var/tmp/smtp-tracker-build-check),
#    with this machine's extra CA certificates, if any.
# 2. `podman build --isolation=chroot` builds the Dockerfile with BASE set to
#    it (the build stage reaches PyPI for the wheels, as a docker build would).
# 3. `podman image mount` + chroot run the image's entry point as its user:
#    `smtp-tracker --help` and `smtp-tracker check-config` on the image's own
#    configuration file (with an upstream, which that file leaves to the user).
# 4. The compose stack's Postfix image (docker/postfix/) is built on the same
#    base and its entry point's configuration passes `postfix check`.
#
# Outside the CI test run: it downloads ~60 MB of Debian packages and the
# wheels. Prints each step's time.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
work=${BUILD_CHECK_DIR:-/var/tmp/smtp-tracker-build-check}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
image=${IMAGE:-localhost/smtp-tracker:build-check}

for tool in podman debootstrap chroot; do
    command -v "$tool" >/dev/null || { echo "build-check: $tool is not installed" >&2; exit 1; }
done
[ "$(id -u)" = 0 ] || { echo "build-check: run as root (debootstrap, chroot)" >&2; exit 1; }

step_started=$SECONDS
all_started=$SECONDS
step() {
    echo "build-check: $1 ($((SECONDS - step_started)) s)"
    step_started=$SECONDS
}

mkdir -p "$work"
# what python:3.11-slim-bookworm has: Python 3.11 with venv, pip and its C headers
packages=python3,python3-venv,python3-pip,python3-dev,ca-certificates
if [ ! -f "$work/rootfs/usr/include/python3.11/Python.h" ] || [ ! -f "$work/rootfs.stamp" ]; then
    rm -rf "$work/rootfs.partial"
    debootstrap --variant=minbase --include="$packages" \
        bookworm "$work/rootfs.partial" "$mirror" >"$work/debootstrap.log"
    rm -rf "$work/rootfs"
    mv "$work/rootfs.partial" "$work/rootfs"
    date +%Y%m%d%H%M%S >"$work/rootfs.stamp"
    step "debootstrap: Debian bookworm root in $work/rootfs"
fi
base=localhost/smtp-tracker-base:bookworm-$(cat "$work/rootfs.stamp")
if ! podman image exists "$base"; then
    # This machine's own extra certificate authorities (a TLS-inspecting proxy's),
    # so that pip in the build trusts what this machine trusts; python:3.11-slim
    # on a machine without such a proxy needs none.
    if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
        cp /usr/local/share/ca-certificates/*.crt "$work/rootfs/usr/local/share/ca-certificates/"
        chroot "$work/rootfs" update-ca-certificates >/dev/null
    fi
    tar -C "$work/rootfs" --numeric-owner -c . \
        | podman import --change 'CMD ["/bin/bash"]' - "$base" >/dev/null
    step "podman import: base image $base"
fi

podman build --isolation=chroot --force-rm --format docker --build-arg "BASE=$base" \
    --file "$here/Dockerfile" --tag "$image" "$repo"
step "podman build: $image"

user=$(podman image inspect --format '{{.Config.User}}' "$image")
entrypoint=$(podman image inspect --format '{{join .Config.Entrypoint " "}}' "$image")
[ "$user" != "" ] && [ "$user" != root ] && [ "$user" != 0 ] && [ "$user" != 0:0 ] \
    || { echo "build-check: the image runs as root ($user)" >&2; exit 1; }
healthcheck=$(podman image inspect --format '{{json .Config.Healthcheck}}' "$image")
[ "$healthcheck" != null ] || { echo "build-check: no HEALTHCHECK in the image" >&2; exit 1; }

root=$(podman image mount "$image")
trap 'podman image unmount "$image" >/dev/null' EXIT
run() {  # the entry point, as the image's user, with the image's PATH
    chroot --userspec="$user" "$root" /usr/bin/env -i \
        PATH=/opt/smtp-tracker/bin:/usr/local/bin:/usr/bin:/bin HOME=/var/lib/smtp-tracker \
        $entrypoint "$@"
}
run --help | head -n 3
run check-config --config /etc/smtp-tracker/smtp-tracker.toml --upstream upstream.example:25
run --version
# the postgresql extra: psycopg (its pure-Python build) finds the image's libpq
chroot --userspec="$user" "$root" /usr/bin/env -i PATH=/opt/smtp-tracker/bin:/usr/bin:/bin \
    python3 -c 'import psycopg; print("psycopg", psycopg.__version__, psycopg.pq.__impl__, "libpq", psycopg.pq.version())'
step "entry point: --help, check-config and --version answer as user $user; psycopg loads libpq"

# The compose stack's Postfix image, on the same base: it builds, and its
# entry point writes a configuration that `postfix check` accepts.
podman build --isolation=chroot --force-rm --format docker --build-arg "BASE=$base" \
    --tag "$image-postfix" "$here/postfix"
# a container's root (not the image's, which is mounted read-only), never started
container=$(podman create --pull=never "$image-postfix")
postfix_root=$(podman mount "$container")
trap 'podman image unmount "$image" >/dev/null; podman unmount "$container" >/dev/null; podman rm "$container" >/dev/null 2>&1' EXIT
chroot "$postfix_root" /usr/local/bin/postfix-entrypoint postconf -n \
    | grep -E '^(transport_maps|mynetworks|smtpd_relay_restrictions) '
chroot "$postfix_root" /usr/local/bin/postfix-entrypoint postfix check
step "postfix image: configured by its entry point, postfix check passes"
echo "build-check: OK in $((SECONDS - all_started)) s"
