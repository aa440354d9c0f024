/* node: the zonegate binary. main() dispatches subcommands; `serve` owns
 * the uv loop and wires config, consensus, gateway and failover; the other
 * subcommands are CLI clients of the admin API. Each entry point returns
 * the process exit status: 0 ok, 1 runtime failure, 2 usage error. */
#ifndef ZG_NODE_H
#define ZG_NODE_H

int node_serve(int argc, char **argv);
int node_config_command(int argc, char **argv);
/* Admin API clients (node/cli.c): status, config get|apply, keys, tokens,
 * audit, members, switchover, drill. */
int node_cli(const char *command, int argc, char **argv);
/* `zonegate drill ...` (node/drill.c). */
int node_drill(int argc, char **argv);
/* `zonegate recover --force` (node/recover.c). */
int node_recover(int argc, char **argv);

#endif
