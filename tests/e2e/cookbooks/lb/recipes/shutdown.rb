# The end-to-end tests' load balancer: shutdown.
backends = (node['opsworks']['layers']['app'] || {})['instances'] || {}
log "lb shutdown: backends #{backends.keys.sort.join(',')}"
