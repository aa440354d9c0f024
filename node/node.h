/* node: the zonegate binary. main() dispatches subcommands; `serve` owns
 * the uv loop and wires config, consensus, gateway and failover; the other
 * subcommands are CLI clients of the admin API. Each entry point returns
 * the process exit status: 0 ok, 1 runtime failure, 2 usage error. */
#ifndef ZG_NODE_H
#define ZG_NODE_H

/* Core dumps off for the whole process (every subcommand holds a secret
 * at some point: master key, cluster secret, admin token, provider keys):
 * PR_SET_DUMPABLE 0 (no core, no ptrace or /proc/PID/mem|environ by the
 * same uid) and RLIMIT_CORE 0. ZONEGATE_ALLOW_CORE_DUMPS=1 leaves them on
 * for one debugging session. Called first thing by main(); `serve` logs
 * the outcome once logging is set up. */
void node_disable_core_dumps(void);
void node_log_core_dump_state(void);

int node_serve(int argc, char **argv);
int node_config_command(int argc, char **argv);
/* Admin API clients (node/cli.c): status, config get|apply, keys, tokens,
 * audit, members, switchover, drill. */
int node_cli(const char *command, int argc, char **argv);
/* `zonegate drill ...` (node/drill.c). */
int node_drill(int argc, char **argv);
/* `zonegate recover --force` (node/recover.c). */
int node_recover(int argc, char **argv);
/* certs.c: `zonegate certs init DIR --nodes ...` (cluster CA + node certificates). */
int node_certs(int argc, char **argv);

#endif
