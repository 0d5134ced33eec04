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

// AppName returns the application_name of a reader's replication
// connection, which synchronous_standby_names names: prism_<name>, where
// name is the node's.
func AppName(name string) string { return NamePrefix + name }
