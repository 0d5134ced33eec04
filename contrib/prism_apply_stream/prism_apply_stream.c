/*
 * prism_apply_stream: a measured PROTOTYPE, not used by prism-cdc.
 *
 * An apply loop inside a backend, fed over COPY: CALL prism_apply_copy()
 * (or prism_apply_copy_spi()) answers with CopyInResponse, and every
 * CopyData the client then sends is one pgbench-shaped transaction
 * (tab-separated: end LSN, commit time, the 17 values of pgbench's three
 * updates and one insert, \N for NULL). Each is applied and committed on
 * its own (SPI_commit in a non-atomic procedure), with the replication
 * origin the session set up carrying its LSN and commit time, so the
 * origin's progress stays exact. CopyDone ends the CALL.
 *
 *   - prism_apply_copy applies the rows by the heap paths (the row found by
 *     its key index, the cheap conflict test, table_tuple_update /
 *     table_tuple_insert and their index entries);
 *   - prism_apply_copy_spi runs the same four SQL statements the benchmark's
 *     bare variant sends over the protocol, through saved SPI plans.
 *
 * Both do the apply set-up's work (the xid, the prism.* settings, the
 * clock_floors test) in C. It knows only pgbench's tables, checks
 * nothing, and an error ends the CALL: it exists to measure what a
 * transaction costs without the protocol's round trip and statements
 * (docs/performance.md, "an apply loop inside the backend"; the
 * benchmark is BenchmarkApplyStreamPrototype).
 *
 * Build (needs the server's headers and, for libpq-be.h, gssapi's):
 *   make -C contrib/prism_apply_stream
 */
#include "postgres.h"

#include "access/commit_ts.h"
#include "access/genam.h"
#include "access/heapam.h"
#include "access/relation.h"
#include "access/table.h"
#include "access/tableam.h"
#include "access/xact.h"
#include "catalog/namespace.h"
#include "catalog/pg_type.h"
#include "executor/executor.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "libpq/libpq.h"
#include "libpq/pqformat.h"
#include "miscadmin.h"
#include "nodes/makefuncs.h"
#include "nodes/parsenodes.h"
#include "replication/origin.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/pg_lsn.h"
#include "utils/rel.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"

PG_MODULE_MAGIC;

PG_FUNCTION_INFO_V1(prism_apply_copy);

static void
open_estate(Relation rel, EState **estate_out, ResultRelInfo **rri_out)
{
	EState	   *estate = CreateExecutorState();
	RangeTblEntry *rte = makeNode(RangeTblEntry);
	ResultRelInfo *rri = makeNode(ResultRelInfo);

	rte->rtekind = RTE_RELATION;
	rte->relid = RelationGetRelid(rel);
	rte->relkind = rel->rd_rel->relkind;
	rte->rellockmode = RowExclusiveLock;
	ExecInitRangeTable(estate, list_make1(rte));
	InitResultRelInfo(rri, rel, 1, NULL, 0);
	estate->es_output_cid = GetCurrentCommandId(true);
	estate->es_snapshot = GetActiveSnapshot();
	ExecOpenIndices(rri, false);
	*estate_out = estate;
	*rri_out = rri;
}

static void
close_estate(EState *estate, ResultRelInfo *rri)
{
	ExecCloseIndices(rri);
	ExecResetTupleTable(estate->es_tupleTable, false);
	FreeExecutorState(estate);
}

static Datum
input(Form_pg_attribute att, char *s)
{
	Oid			typinput,
				typioparam;

	getTypeInputInfo(att->atttypid, &typinput, &typioparam);
	return OidInputFunctionCall(typinput, s, typioparam, att->atttypmod);
}

static void
txn_update(Relation rel, TimestampTz ts, int16 keyatt, char *keyval, int nsets, int16 *atts, char **vals)
{
	TupleDesc	desc = RelationGetDescr(rel);
	EState	   *estate;
	ResultRelInfo *rri;
	Relation	idx = NULL;
	ScanKeyData skey;
	IndexScanDesc scan;
	TupleTableSlot *oldslot,
			   *newslot;
	Oid			op;
	TM_Result	res;
	TM_FailureData tmfd;
	LockTupleMode lockmode;
	bool		update_indexes,
				isnull;
	TransactionId xmin;
	TimestampTz cts;

	open_estate(rel, &estate, &rri);
	for (int i = 0; i < rri->ri_NumIndices && idx == NULL; i++)
	{
		IndexInfo  *ii = rri->ri_IndexRelationInfo[i];

		if (ii->ii_Unique && ii->ii_NumIndexKeyAttrs == 1 && ii->ii_IndexAttrNumbers[0] == keyatt)
			idx = rri->ri_IndexRelationDescs[i];
	}
	if (idx == NULL)
		elog(ERROR, "no key index");
	op = get_opfamily_member(idx->rd_opfamily[0], idx->rd_opcintype[0], idx->rd_opcintype[0], BTEqualStrategyNumber);
	ScanKeyInit(&skey, 1, BTEqualStrategyNumber, get_opcode(op), input(TupleDescAttr(desc, keyatt - 1), keyval));
	skey.sk_collation = idx->rd_indcollation[0];
	oldslot = table_slot_create(rel, &estate->es_tupleTable);
	scan = index_beginscan(rel, idx, estate->es_snapshot, 1, 0);
	index_rescan(scan, &skey, 1, NULL, 0);
	if (!index_getnext_slot(scan, ForwardScanDirection, oldslot))
		elog(ERROR, "row not found");
	index_endscan(scan);
	xmin = DatumGetTransactionId(slot_getsysattr(oldslot, MinTransactionIdAttributeNumber, &isnull));
	if (TransactionIdIsNormal(xmin) && !TransactionIdIsCurrentTransactionId(xmin) &&
		TransactionIdGetCommitTsData(xmin, &cts, NULL) && cts >= ts)
		elog(ERROR, "not the cheap path");
	newslot = ExecInitExtraTupleSlot(estate, desc, &TTSOpsVirtual);
	slot_getallattrs(oldslot);
	ExecClearTuple(newslot);
	memcpy(newslot->tts_values, oldslot->tts_values, sizeof(Datum) * desc->natts);
	memcpy(newslot->tts_isnull, oldslot->tts_isnull, sizeof(bool) * desc->natts);
	for (int s = 0; s < nsets; s++)
	{
		int			a = atts[s] - 1;

		newslot->tts_isnull[a] = vals[s] == NULL;
		newslot->tts_values[a] = vals[s] == NULL ? (Datum) 0 : input(TupleDescAttr(desc, a), vals[s]);
	}
	ExecStoreVirtualTuple(newslot);
	if (desc->constr)
		ExecConstraints(rri, newslot, estate);
	res = table_tuple_update(rel, &oldslot->tts_tid, newslot, estate->es_output_cid,
							 estate->es_snapshot, InvalidSnapshot, true, &tmfd, &lockmode, &update_indexes);
	if (res == TM_Updated || res == TM_Deleted)
		ereport(ERROR, (errcode(ERRCODE_T_R_SERIALIZATION_FAILURE),
						errmsg("could not serialize access due to concurrent update")));
	if (res != TM_Ok)
		elog(ERROR, "update status %u", res);
	if (update_indexes && rri->ri_NumIndices > 0)
		ExecInsertIndexTuples(rri, newslot, estate, true, false, NULL, NIL);
	close_estate(estate, rri);
}

static void
txn_insert(Relation rel, int n, int16 *atts, char **vals)
{
	TupleDesc	desc = RelationGetDescr(rel);
	EState	   *estate;
	ResultRelInfo *rri;
	TupleTableSlot *slot;

	open_estate(rel, &estate, &rri);
	slot = ExecInitExtraTupleSlot(estate, desc, &TTSOpsVirtual);
	ExecClearTuple(slot);
	for (int a = 0; a < desc->natts; a++)
	{
		slot->tts_isnull[a] = true;
		slot->tts_values[a] = (Datum) 0;
	}
	for (int s = 0; s < n; s++)
	{
		int			a = atts[s] - 1;

		slot->tts_isnull[a] = vals[s] == NULL;
		slot->tts_values[a] = vals[s] == NULL ? (Datum) 0 : input(TupleDescAttr(desc, a), vals[s]);
	}
	ExecStoreVirtualTuple(slot);
	if (desc->constr)
		ExecConstraints(rri, slot, estate);
	table_tuple_insert(rel, slot, estate->es_output_cid, 0, NULL);
	if (rri->ri_NumIndices > 0)
		ExecInsertIndexTuples(rri, slot, estate, false, false, NULL, NIL);
	close_estate(estate, rri);
}

#define NFIELDS 19

static SPIPlanPtr plans[4];

static void
spi_rows(char **f)
{
	static const char *sql[] = {
		"UPDATE pgbench_accounts SET bid = $2::int, abalance = $3::int, filler = $4::bpchar WHERE aid = $1::int",
		"UPDATE pgbench_tellers SET bid = $2::int, tbalance = $3::int, filler = $4::bpchar WHERE tid = $1::int",
		"UPDATE pgbench_branches SET bbalance = $2::int, filler = $3::bpchar WHERE bid = $1::int",
		"INSERT INTO pgbench_history (tid, bid, aid, delta, mtime, filler) VALUES ($1::int, $2::int, $3::int, $4::int, $5::timestamp, $6::bpchar)",
	};
	int			counts[] = {4, 4, 3, 6};
	int			pos = 2;

	for (int c = 0; c < 4; c++)
	{
		Oid			types[6] = {TEXTOID, TEXTOID, TEXTOID, TEXTOID, TEXTOID, TEXTOID};
		Datum		vals[6];
		char		nulls[6];

		if (plans[c] == NULL)
		{
			plans[c] = SPI_prepare(sql[c], counts[c], types);
			if (plans[c] == NULL)
				elog(ERROR, "SPI_prepare: %d", SPI_result);
			SPI_keepplan(plans[c]);
		}
		for (int i = 0; i < counts[c]; i++)
		{
			char	   *v = f[pos + i];

			nulls[i] = v == NULL ? 'n' : ' ';
			vals[i] = v == NULL ? (Datum) 0 : CStringGetTextDatum(v);
		}
		if (SPI_execute_plan(plans[c], vals, nulls, false, 0) < 0)
			elog(ERROR, "SPI_execute_plan");
		pos += counts[c];
	}
}

static bool use_spi;

static void
apply_one(StringInfo msg, Oid *rels, const char *src, const char *local)
{
	static int16 atts[] = {1, 2, 3, 4, 1, 2, 3, 4, 1, 2, 3, 1, 2, 3, 4, 5, 6};
	char	   *f[NFIELDS];
	char	   *p = msg->data;
	int			n = 0;
	XLogRecPtr	lsn;
	TimestampTz ts;
	bool		floors;

	msg->data[msg->len] = '\0';
	if (msg->len > 0 && msg->data[msg->len - 1] == '\n')
		msg->data[msg->len - 1] = '\0';
	while (n < NFIELDS)
	{
		char	   *t = strchr(p, '\t');

		f[n++] = p;
		if (t == NULL)
			break;
		*t = '\0';
		p = t + 1;
	}
	if (n != NFIELDS)
		elog(ERROR, "%d fields", n);
	for (int i = 2; i < NFIELDS; i++)
		if (strcmp(f[i], "\\N") == 0)
			f[i] = NULL;
	lsn = DatumGetLSN(DirectFunctionCall1(pg_lsn_in, CStringGetDatum(f[0])));
	ts = DatumGetTimestampTz(DirectFunctionCall3(timestamptz_in, CStringGetDatum(f[1]), ObjectIdGetDatum(InvalidOid), Int32GetDatum(-1)));

	(void) GetTopTransactionId();
	set_config_option("prism.remote_lsn", f[0], PGC_USERSET, PGC_S_SESSION, GUC_ACTION_LOCAL, true, 0, false);
	set_config_option("prism.remote_ts", f[1], PGC_USERSET, PGC_S_SESSION, GUC_ACTION_LOCAL, true, 0, false);
	set_config_option("prism.remote_region", src, PGC_USERSET, PGC_S_SESSION, GUC_ACTION_LOCAL, true, 0, false);
	set_config_option("prism.local_region", local, PGC_USERSET, PGC_S_SESSION, GUC_ACTION_LOCAL, true, 0, false);
	{
		Oid			fl = RangeVarGetRelid(makeRangeVar("prism", "clock_floors", -1), AccessShareLock, false);
		Relation	r = table_open(fl, NoLock);
		TableScanDesc scan = table_beginscan(r, GetActiveSnapshot(), 0, NULL);

		floors = heap_getnext(scan, ForwardScanDirection) != NULL;
		table_endscan(scan);
		table_close(r, NoLock);
	}
	set_config_option("prism.floors", floors ? "true" : "false", PGC_USERSET, PGC_S_SESSION, GUC_ACTION_LOCAL, true, 0, false);
	set_config_option("prism.applying", "on", PGC_USERSET, PGC_S_SESSION, GUC_ACTION_LOCAL, true, 0, false);

	if (use_spi)
		spi_rows(f);
	else
	{
		int			pos = 2;
		int			counts[] = {4, 4, 3, 6};
		int			apos = 0;

		for (int c = 0; c < 4; c++)
		{
			Relation	rel = table_open(rels[c], RowExclusiveLock);

			if (c > 0)
			{
				CommandCounterIncrement();
				UpdateActiveSnapshotCommandId();
			}
			if (c < 3)
				txn_update(rel, ts, atts[apos], f[pos], counts[c] - 1, atts + apos + 1, f + pos + 1);
			else
				txn_insert(rel, counts[c], atts + apos, f + pos);
			pos += counts[c];
			apos += counts[c];
			table_close(rel, NoLock);
		}
	}
	if (replorigin_session_origin == InvalidRepOriginId)
		elog(ERROR, "no replication origin is configured");
	replorigin_session_origin_lsn = lsn;
	replorigin_session_origin_timestamp = ts;
}

static Datum apply_copy(FunctionCallInfo fcinfo);

PG_FUNCTION_INFO_V1(prism_apply_copy_spi);
Datum
prism_apply_copy_spi(PG_FUNCTION_ARGS)
{
	use_spi = true;
	return apply_copy(fcinfo);
}

Datum
prism_apply_copy(PG_FUNCTION_ARGS)
{
	use_spi = false;
	return apply_copy(fcinfo);
}

static Datum
apply_copy(FunctionCallInfo fcinfo)
{
	StringInfoData buf;
	StringInfoData msg;
	Oid			rels[4];
	const char *names[] = {"pgbench_accounts", "pgbench_tellers", "pgbench_branches", "pgbench_history"};
	MemoryContext txnctx;
	long		applied = 0;

	if (fcinfo->context == NULL || !IsA(fcinfo->context, CallContext) || ((CallContext *) fcinfo->context)->atomic)
		elog(ERROR, "CALL prism_apply_copy() outside a transaction block");
	SPI_connect_ext(SPI_OPT_NONATOMIC);
	for (int i = 0; i < 4; i++)
		rels[i] = RangeVarGetRelid(makeRangeVar("public", (char *) names[i], -1), NoLock, false);

	pq_beginmessage(&buf, 'G');
	pq_sendbyte(&buf, 0);
	pq_sendint16(&buf, 0);
	pq_endmessage(&buf);
	pq_flush();

	txnctx = AllocSetContextCreate(TopMemoryContext, "prism apply", ALLOCSET_DEFAULT_SIZES);
	initStringInfo(&msg);
	for (;;)
	{
		int			mtype;

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
			ereport(ERROR, (errmsg("COPY from stdin failed: %s", pq_getmsgstring(&msg))));
		if (mtype == 'H' || mtype == 'S')
			continue;
		if (mtype != 'd')
			ereport(ERROR, (errmsg("unexpected message type 0x%02X during COPY", mtype)));
		{
			MemoryContext old = MemoryContextSwitchTo(txnctx);

			PushActiveSnapshot(GetTransactionSnapshot());
			apply_one(&msg, rels, "bench", "bench-target");
			PopActiveSnapshot();
			MemoryContextSwitchTo(old);
			SPI_commit();
			MemoryContextReset(txnctx);
			applied++;
		}
	}
	SPI_finish();
	elog(LOG, "prism_apply_copy applied %ld", applied);
	PG_RETURN_VOID();
}
