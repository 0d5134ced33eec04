#!/usr/bin/env bash
# Builds contrib/prism_pgoutput for the machine's PostgreSQL, into a
# directory of its own, for the tests and prism-bench (which point
# dynamic_library_path of their throwaway clusters at it). Where the
# server's headers are not installed (Debian's postgresql-server-dev-<major>
# pulls in clang and LLVM), it downloads that package with apt-get and
# unpacks only its headers. Idempotent: does nothing when the library is
# newer than its source.
#
#   scripts/build-prism-pgoutput.sh [pg_config] [dir]
#
# pg_config defaults to the newest /usr/lib/postgresql/*/bin/pg_config (as
# the tests' clusters do), dir to /var/tmp/prism-cdc-plugin/<major>. The
# directory must be readable by the OS user the clusters run as.
#
# To install the plugin into a real server use contrib/prism_pgoutput's
# Makefile instead (make install), see the README.
set -euo pipefail

src=$(cd "$(dirname "$0")/.." && pwd)/contrib/prism_pgoutput/prism_pgoutput.c
pg_config=${1:-}
if [ -z "$pg_config" ]; then
	pg_config=$(ls -d /usr/lib/postgresql/*/bin/pg_config 2>/dev/null | sort -t/ -k5 -n | tail -n1 || true)
	[ -n "$pg_config" ] || pg_config=$(command -v pg_config || true)
fi
if [ -z "$pg_config" ] || [ ! -x "$pg_config" ]; then
	echo "error: pg_config not found (looked in /usr/lib/postgresql/*/bin and PATH); install PostgreSQL's server (apt-get install -y postgresql-15) or pass pg_config's path" >&2
	exit 1
fi
version=$("$pg_config" --version | awk '{print $2}')
major=${version%%.*}
dir=${2:-/var/tmp/prism-cdc-plugin/$major}
out=$dir/prism_pgoutput.so

if [ -f "$out" ] && [ "$out" -nt "$src" ] && [ "$(cat "$dir/VERSION" 2>/dev/null)" = "$version" ]; then
	exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
inc=$("$pg_config" --includedir-server)
if [ ! -f "$inc/postgres.h" ]; then
	pkg=postgresql-server-dev-$major
	command -v apt-get >/dev/null 2>&1 || {
		echo "error: PostgreSQL's server headers are not in $inc and apt-get is not available to fetch them; install $pkg (or your system's equivalent)" >&2
		exit 1
	}
	# The headers of the installed server's exact version where the
	# archive still has it; any of the same major version build the same.
	installed=$(dpkg-query -W -f='${Version}' "postgresql-$major" 2>/dev/null || true)
	echo "== fetching the headers of PostgreSQL $major ($pkg${installed:+ $installed})"
	(
		cd "$work"
		get() { apt-get download -q -o APT::Sandbox::User=root "$@" >/dev/null; }
		{ [ -n "$installed" ] && get "$pkg=$installed"; } || get "$pkg" || {
			apt-get update -q >/dev/null && get "$pkg"
		}
	) || {
		echo "error: could not download $pkg with apt-get; install it (apt-get install -y $pkg) and run this again" >&2
		exit 1
	}
	dpkg-deb -x "$work"/"$pkg"_*.deb "$work/root"
	inc=$work/root$inc
	[ -f "$inc/postgres.h" ] || {
		echo "error: $pkg has no postgres.h under $inc" >&2
		exit 1
	}
fi

cc=${CC:-$("$pg_config" --cc | awk '{print $1}')}
command -v "$cc" >/dev/null 2>&1 || cc=gcc
mkdir -p "$dir"
# shellcheck disable=SC2046 # pg_config prints flags meant to be split
"$cc" $("$pg_config" --cflags) $("$pg_config" --cflags_sl) -I"$inc" -shared -o "$work/prism_pgoutput.so" "$src"
mv "$work/prism_pgoutput.so" "$out"
echo "$version" >"$dir/VERSION"
chmod -R a+rX "$dir"
echo "== built $out for PostgreSQL $version"
