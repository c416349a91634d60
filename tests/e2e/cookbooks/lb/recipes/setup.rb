# The end-to-end tests' load balancer: setup.
backends = (node['opsworks']['layers']['app'] || {})['instances'] || {}
log "lb setup: backends #{backends.keys.sort.join(',')}"
