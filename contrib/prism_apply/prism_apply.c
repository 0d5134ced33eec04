/*
 * prism_apply: the apply procedure of prism-cdc (optional).
 *
 * CALL prism.apply_copy(flush) answers with CopyInResponse; the client then
 * sends one run of transactions as CopyData messages and ends it with
 * CopyDone. It runs the applier's own prepared statements, through saved
 * SPI plans, so the conflict rules stay in the SQL they are written in;
 * what it saves is the protocol: a run is one CALL instead of a Bind and
 * an Execute per statement and a round trip per transaction.
 *
 * Each CopyData is one of:
 *
 *   'P' int32 id, string sql, int16 nparams, int32 type oid * nparams
 *       defines statement id for the rest of the CALL (ids count from 0
 *       in every CALL; the plans themselves are kept for the backend's
 *       life, keyed by their text and types);
 *   'T' int32 ncmds, then per command: int32 id, int16 nparams, then per
 *       parameter: int16 format (0 text, 1 binary), int32 length (-1 NULL),
 *       the bytes
 *       one transaction, begun REPEATABLE READ, run and committed on its
 *       own (SPI_commit: the procedure is non-atomic).
 *
 * All integers are in network byte order, as in the protocol. Any error
 * ends the CALL with that error: the transactions before the failing one
 * are committed (the session's replication origin says up to where), the
 * failing one is rolled back, and whatever the client still sends is
 * ignored by the server until CopyDone. flush = true flushes the WAL up
 * to the last commit before the CALL returns (the client's sessions run
 * with synchronous_commit = off).
 *
 * It runs with the caller's privileges and does what the caller could do
 * with the same statements sent one by one.
 *
 * Build and install (needs the server's headers):
 *   make -C contrib/prism_apply && make -C contrib/prism_apply install
 * then, as a superuser, in every region's database (a node whose role is
 * a superuser does it itself when it starts):
 *   CREATE PROCEDURE prism.apply_copy(flush boolean)
 *     LANGUAGE c AS 'prism_apply', 'prism_apply_copy';
 */
#include "postgres.h"

#include "access/xact.h"
#include "access/xlog.h"
#include "common/hashfn.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "libpq/libpq.h"
#include "libpq/pqformat.h"
#include "mb/pg_wchar.h"
#include "miscadmin.h"
#include "nodes/parsenodes.h"
#include "tcop/dest.h"
#include "tcop/tcopprot.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"

PG_MODULE_MAGIC;

PG_FUNCTION_INFO_V1(prism_apply_copy);

/* Bounds on what one CALL may define and one statement may take. */
#define MAX_CALL_STMTS 4096
#define MAX_CACHED 1024
#define NBUCKETS 256

/* A saved plan with what converts its parameters. */
typedef struct ApplyPlan
{
	uint32		hash;
	char	   *sql;
	int			nargs;
	Oid		   *types;
	SPIPlanPtr	plan;
	/* per parameter, filled on first use of each format */
	FmgrInfo   *in;
	Oid		   *inparam;
	FmgrInfo   *recv;
	Oid		   *recvparam;
	struct ApplyPlan *next;
} ApplyPlan;

static ApplyPlan *buckets[NBUCKETS];
static int	ncached;
static MemoryContext cachecxt;

/* The statements the current CALL defined, by id. */
static ApplyPlan *callplans[MAX_CALL_STMTS];
static int	ncallplans;

static uint32
plan_hash(const char *sql, int nargs, const Oid *types)
{
	uint32		h = hash_bytes((const unsigned char *) sql, strlen(sql));

	if (nargs > 0)
		h ^= hash_bytes((const unsigned char *) types, nargs * sizeof(Oid));
	return h;
}

static void
forget_plans(void)
{
	for (int b = 0; b < NBUCKETS; b++)
	{
		for (ApplyPlan *p = buckets[b]; p != NULL; p = p->next)
			SPI_freeplan(p->plan);
		buckets[b] = NULL;
	}
	ncached = 0;
	if (cachecxt != NULL)
		MemoryContextReset(cachecxt);
}

/* lookup_plan returns the saved plan of sql with the given parameter types. */
static ApplyPlan *
lookup_plan(const char *sql, int nargs, Oid *types)
{
	uint32		h = plan_hash(sql, nargs, types);
	ApplyPlan	   *p;
	SPIPlanPtr	plan;
	MemoryContext old;

	for (p = buckets[h % NBUCKETS]; p != NULL; p = p->next)
		if (p->hash == h && p->nargs == nargs && strcmp(p->sql, sql) == 0 &&
			(nargs == 0 || memcmp(p->types, types, nargs * sizeof(Oid)) == 0))
			return p;

	plan = SPI_prepare(sql, nargs, types);
	if (plan == NULL)
		elog(ERROR, "prism_apply: SPI_prepare failed: %s", SPI_result_code_string(SPI_result));
	if (ncached >= MAX_CACHED)
	{
		/* A schema that keeps changing: start over rather than grow. */
		forget_plans();
		ncallplans = 0;
		elog(ERROR, "prism_apply: more than %d statements; the cache was reset, call again", MAX_CACHED);
	}
	if (SPI_keepplan(plan) != 0)
		elog(ERROR, "prism_apply: SPI_keepplan failed");
	if (cachecxt == NULL)
		cachecxt = AllocSetContextCreate(TopMemoryContext, "prism_apply plans", ALLOCSET_SMALL_SIZES);
	old = MemoryContextSwitchTo(cachecxt);
	p = palloc0(sizeof(ApplyPlan));
	p->hash = h;
	p->sql = pstrdup(sql);
	p->nargs = nargs;
	p->types = palloc0(sizeof(Oid) * Max(nargs, 1));
	if (nargs > 0)
		memcpy(p->types, types, nargs * sizeof(Oid));
	p->in = palloc0(sizeof(FmgrInfo) * Max(nargs, 1));
	p->inparam = palloc0(sizeof(Oid) * Max(nargs, 1));
	p->recv = palloc0(sizeof(FmgrInfo) * Max(nargs, 1));
	p->recvparam = palloc0(sizeof(Oid) * Max(nargs, 1));
	MemoryContextSwitchTo(old);
	p->plan = plan;
	p->next = buckets[h % NBUCKETS];
	buckets[h % NBUCKETS] = p;
	ncached++;
	return p;
}

static void
define(StringInfo msg)
{
	int			id = pq_getmsgint(msg, 4);
	const char *sql = pq_getmsgstring(msg);
	int			nargs = pq_getmsgint(msg, 2);
	Oid		   *types;

	if (id != ncallplans || id >= MAX_CALL_STMTS)
		ereport(ERROR, (errcode(ERRCODE_PROTOCOL_VIOLATION),
						errmsg("prism_apply: statement %d defined out of order (expected %d, at most %d)", id, ncallplans, MAX_CALL_STMTS)));
	if (nargs < 0)
		ereport(ERROR, (errcode(ERRCODE_PROTOCOL_VIOLATION), errmsg("prism_apply: negative parameter count")));
	types = palloc(sizeof(Oid) * Max(nargs, 1));
	for (int i = 0; i < nargs; i++)
		types[i] = (Oid) pq_getmsgint(msg, 4);
	pq_getmsgend(msg);
	callplans[ncallplans++] = lookup_plan(sql, nargs, types);
}

/* param converts parameter i of p from the message, as exec_bind_message does. */
static Datum
param(ApplyPlan *p, int i, StringInfo msg, bool *isnull)
{
	int			format = pq_getmsgint(msg, 2);
	int			len = pq_getmsgint(msg, 4);
	Oid			type = p->types[i];
	char	   *buf = NULL;
	Datum		d;

	if (len < -1 || len > msg->len - msg->cursor)
		ereport(ERROR, (errcode(ERRCODE_PROTOCOL_VIOLATION), errmsg("prism_apply: bad length %d of parameter %d", len, i + 1)));
	*isnull = len == -1;
	if (!*isnull)
	{
		buf = palloc(len + 1);
		memcpy(buf, pq_getmsgbytes(msg, len), len);
		buf[len] = '\0';
	}
	if (format == 0)
	{
		char	   *s = buf;

		if (p->in[i].fn_oid == InvalidOid)
		{
			Oid			fn;

			getTypeInputInfo(type, &fn, &p->inparam[i]);
			fmgr_info_cxt(fn, &p->in[i], cachecxt);
		}
		if (s != NULL)
			s = pg_client_to_server(s, len);
		d = InputFunctionCall(&p->in[i], s, p->inparam[i], -1);
	}
	else if (format == 1)
	{
		StringInfoData pbuf;

		if (p->recv[i].fn_oid == InvalidOid)
		{
			Oid			fn;

			getTypeBinaryInputInfo(type, &fn, &p->recvparam[i]);
			fmgr_info_cxt(fn, &p->recv[i], cachecxt);
		}
		if (*isnull)
			d = ReceiveFunctionCall(&p->recv[i], NULL, p->recvparam[i], -1);
		else
		{
			pbuf.data = buf;
			pbuf.len = len;
			pbuf.maxlen = len + 1;
			pbuf.cursor = 0;
			d = ReceiveFunctionCall(&p->recv[i], &pbuf, p->recvparam[i], -1);
			if (pbuf.cursor != pbuf.len)
				ereport(ERROR, (errcode(ERRCODE_INVALID_BINARY_REPRESENTATION),
								errmsg("incorrect binary data format in bind parameter %d", i + 1)));
		}
	}
	else
		ereport(ERROR, (errcode(ERRCODE_INVALID_PARAMETER_VALUE), errmsg("unsupported format code: %d", format)));
	return d;
}

/* transaction runs one 'T' message's commands; the caller commits. */
static void
transaction(StringInfo msg)
{
	int			ncmds = pq_getmsgint(msg, 4);

	for (int c = 0; c < ncmds; c++)
	{
		int			id = pq_getmsgint(msg, 4);
		int			nparams = pq_getmsgint(msg, 2);
		ApplyPlan	   *p;
		Datum	   *values;
		char	   *nulls;
		int			rc;

		if (id < 0 || id >= ncallplans)
			ereport(ERROR, (errcode(ERRCODE_PROTOCOL_VIOLATION), errmsg("prism_apply: statement %d is not defined", id)));
		p = callplans[id];
		if (nparams != p->nargs)
			ereport(ERROR, (errcode(ERRCODE_PROTOCOL_VIOLATION),
							errmsg("prism_apply: statement %d takes %d parameters, got %d", id, p->nargs, nparams)));
		values = palloc(sizeof(Datum) * Max(nparams, 1));
		nulls = palloc(Max(nparams, 1));
		for (int i = 0; i < nparams; i++)
		{
			bool		isnull;

			values[i] = param(p, i, msg, &isnull);
			nulls[i] = isnull ? 'n' : ' ';
		}
		rc = SPI_execute_plan(p->plan, values, nulls, false, 0);
		if (rc < 0)
			elog(ERROR, "prism_apply: SPI_execute_plan failed: %s", SPI_result_code_string(rc));
	}
	pq_getmsgend(msg);
}

Datum
prism_apply_copy(PG_FUNCTION_ARGS)
{
	bool		flush = PG_ARGISNULL(0) ? false : PG_GETARG_BOOL(0);
	StringInfoData buf;
	StringInfoData msg;
	MemoryContext txncxt;
	MemoryContext old;

	if (fcinfo->context == NULL || !IsA(fcinfo->context, CallContext) || ((CallContext *) fcinfo->context)->atomic)
		ereport(ERROR, (errcode(ERRCODE_INVALID_TRANSACTION_TERMINATION),
						errmsg("prism.apply_copy() must be called on its own, outside a transaction block")));
	if (whereToSendOutput != DestRemote)
		ereport(ERROR, (errcode(ERRCODE_FEATURE_NOT_SUPPORTED), errmsg("prism.apply_copy() needs a client connection")));
	ncallplans = 0;
	SPI_connect_ext(SPI_OPT_NONATOMIC);

	pq_beginmessage(&buf, 'G');
	pq_sendbyte(&buf, 0);
	pq_sendint16(&buf, 0);
	pq_endmessage(&buf);
	pq_flush();

	txncxt = AllocSetContextCreate(PortalContext, "prism_apply transaction", ALLOCSET_DEFAULT_SIZES);
	initStringInfo(&msg);
	XactIsoLevel = XACT_REPEATABLE_READ;
	for (;;)
	{
		int			mtype;

		CHECK_FOR_INTERRUPTS();
		pq_startmsgread();
		mtype = pq_getbyte();
		if (mtype == EOF)
			ereport(ERROR, (errcode(ERRCODE_CONNECTION_FAILURE), errmsg("unexpected EOF on client connection")));
		resetStringInfo(&msg);
		if (pq_getmessage(&msg, mtype == 'd' ? PQ_LARGE_MESSAGE_LIMIT : PQ_SMALL_MESSAGE_LIMIT))
			ereport(ERROR, (errcode(ERRCODE_CONNECTION_FAILURE), errmsg("unexpected EOF on client connection")));
		if (mtype == 'c')
			break;
		if (mtype == 'f')
			ereport(ERROR, (errcode(ERRCODE_QUERY_CANCELED), errmsg("COPY from stdin failed: %s", pq_getmsgstring(&msg))));
		if (mtype == 'H' || mtype == 'S')
			continue;
		if (mtype != 'd')
			ereport(ERROR, (errcode(ERRCODE_PROTOCOL_VIOLATION), errmsg("unexpected message type 0x%02X during COPY from stdin", mtype)));
		if (msg.len < 1)
			ereport(ERROR, (errcode(ERRCODE_PROTOCOL_VIOLATION), errmsg("prism_apply: empty message")));
		old = MemoryContextSwitchTo(txncxt);
		switch (pq_getmsgbyte(&msg))
		{
			case 'P':
				define(&msg);
				break;
			case 'T':
				transaction(&msg);
				MemoryContextSwitchTo(old);
				SPI_commit();
				/* The next transaction, begun by SPI_commit, has no snapshot yet. */
				XactIsoLevel = XACT_REPEATABLE_READ;
				break;
			default:
				ereport(ERROR, (errcode(ERRCODE_PROTOCOL_VIOLATION), errmsg("prism_apply: unknown message kind")));
		}
		MemoryContextSwitchTo(old);
		MemoryContextReset(txncxt);
	}
	if (flush && XactLastCommitEnd != InvalidXLogRecPtr)
		XLogFlush(XactLastCommitEnd);
	SPI_finish();
	PG_RETURN_VOID();
}
