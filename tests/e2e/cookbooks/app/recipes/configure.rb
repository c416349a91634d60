# The end-to-end tests' app server: configure.
log "app configure on #{node['opsworks']['instance']['hostname']}"
