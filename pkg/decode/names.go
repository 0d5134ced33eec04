package decode

// The names prism-cdc gives to what it creates in Postgres, one function
// per kind. Each is NamePrefix followed by a region or node name.

// NamePrefix begins every slot, replication origin and application name
// of prism-cdc.
const NamePrefix = "prism_"

// SlotName returns the default name of region's logical replication slot:
// prism_<region>.
func SlotName(region string) string { return NamePrefix + region }

// OriginName returns the replication origin that records, in a target
// database, the progress of the transactions of source region region:
// prism_<region> (Txn.Origin names the region).
func OriginName(region string) string { return NamePrefix + region }

// AppName returns the application_name prism_<name>. A reader's
// replication connection, which synchronous_standby_names names, uses
// the node's name; other sessions name their role (e.g. "cli").
func AppName(name string) string { return NamePrefix + name }

// OriginRegionSQL is an SQL expression for the source region that the
// text column roname (of pg_replication_origin) names: OriginName's
// inverse, or roname itself when it is not one of prism-cdc's origins.
const OriginRegionSQL = "CASE WHEN starts_with(roname, '" + NamePrefix + "') THEN substr(roname, length('" + NamePrefix + "') + 1) ELSE roname END"

// OriginNameSQL is an SQL expression for OriginName(source_region), for
// the text column source_region (of prism.dead_letters).
const OriginNameSQL = "'" + NamePrefix + "' || source_region"
