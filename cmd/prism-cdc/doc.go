// Command prism-cdc keeps several regional copies of one PostgreSQL database
// in sync through logical replication.
//
//	prism-cdc run      --config FILE   run one node until SIGINT/SIGTERM
//	prism-cdc doctor   --config FILE   check the database and peers
//	prism-cdc status   --config FILE   per-region replication status
//	prism-cdc verify   --config FILE   compare replicated tables across regions
//	prism-cdc version
//
// Exit status is 0 on success, 1 on a finding or failure and 2 on bad usage
// or a bad configuration.
//
// main only parses flags, loads the configuration, builds the root logger
// and the signal context, and hands them to the subcommand.
package main
