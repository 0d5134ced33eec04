/*
 * prism_pgoutput: PostgreSQL's pgoutput, leaving out what was applied.
 *
 * A logical decoding output plugin that is pgoutput in every respect
 * (protocol, options, publications), except that the server skips the
 * changes of every transaction that carries a replication origin while
 * decoding them, instead of sending them. That is what pgoutput does from
 * PostgreSQL 16 on when asked for origin 'none'; before 16 it sends them,
 * and a prism-cdc node, which needs only its region's own writes, drops
 * them. In a region that applies the other regions' streams, that is every
 * applied change: the region's walsender decodes and sends each of them
 * once more, and its node reads and parses them, for nothing.
 *
 * The plugin loads pgoutput and replaces its origin filter; it has no
 * state, options or SQL objects of its own. Build it against the server's
 * headers (see Makefile) and copy prism_pgoutput.so into the server's
 * pkglibdir, or a directory named in dynamic_library_path.
 */
#include "postgres.h"

#include "fmgr.h"
#include "replication/logical.h"
#include "replication/origin.h"
#include "replication/output_plugin.h"

PG_MODULE_MAGIC;

extern PGDLLEXPORT void _PG_output_plugin_init(OutputPluginCallbacks *cb);

/* Skip every change of a transaction that carries a replication origin. */
static bool
prism_origin_filter(LogicalDecodingContext *ctx, RepOriginId origin_id)
{
	return origin_id != InvalidRepOriginId;
}

void
_PG_output_plugin_init(OutputPluginCallbacks *cb)
{
	LogicalOutputPluginInit pgoutput_init;

	pgoutput_init = (LogicalOutputPluginInit)
		load_external_function("pgoutput", "_PG_output_plugin_init", true, NULL);
	pgoutput_init(cb);
	cb->filter_by_origin_cb = prism_origin_filter;
}
