#!/usr/bin/env bash
# System packages the tests use: a compiler and cmake (llama-cpp-python builds from source), Debian's OpenSSH
# server (tests/sshd.py runs a real sshd on 127.0.0.1), Chromium (the HTML report is rendered headless), and for
# the emulated Raspberry Pi (tests/pi-emu) qemu-user with binfmt, debootstrap and the aarch64 cross compilers.
# Installs what is missing when run as root with apt; otherwise lists it (those tests then skip with a reason).
set -euo pipefail
need=()
for tool in cmake g++ make; do command -v "$tool" >/dev/null || need+=("$tool"); done
python3 -c "import venv, ensurepip" 2>/dev/null || need+=(python3-venv)
[ -x /usr/sbin/sshd ] || need+=(openssh-server)
command -v chromium >/dev/null || need+=(chromium)
command -v qemu-aarch64-static >/dev/null || need+=(qemu-user-static)
command -v update-binfmts >/dev/null || need+=(binfmt-support)
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v aarch64-linux-gnu-g++ >/dev/null || need+=(g++-aarch64-linux-gnu)
((${#need[@]})) || exit 0
pkgs=$(printf '%s\n' "${need[@]}" | sed 's/^g++$/build-essential/' | sort -u | tr '\n' ' ')
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q && apt-get install -y -q $pkgs
else
  echo "system-deps: missing $pkgs; install them (e.g. sudo apt-get install $pkgs) or their tests skip" >&2
fi
