# The end-to-end tests' load balancer: configure.
backends = (node['opsworks']['layers']['app'] || {})['instances'] || {}
log "lb configure: backends #{backends.keys.sort.join(',')}"
