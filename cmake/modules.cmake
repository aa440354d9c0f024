# The module graph (DESIGN.md, Folders; README, Code layout): each module
# folder and the modules it may use, lowest first. The build links each
# module's library with exactly these, and cmake/check_module_graph.cmake
# fails the build on an #include of any other module, or of another
# module's private header (only <module>/<module>.h is public).
set(ZG_MODULES base httpd config upstream consensus gateway failover alerts)
set(ZG_DEPS_base "")
set(ZG_DEPS_httpd base)
set(ZG_DEPS_config base)
set(ZG_DEPS_upstream base)
set(ZG_DEPS_consensus base)
# DESIGN: the gateway may read consensus; today it does so only through
# node/'s gateway_cluster hooks.
set(ZG_DEPS_gateway base config httpd upstream consensus)
set(ZG_DEPS_failover base config consensus gateway)
set(ZG_DEPS_alerts base consensus failover gateway)
# node/ (the binary) wires everything.
set(ZG_DEPS_node ${ZG_MODULES})
