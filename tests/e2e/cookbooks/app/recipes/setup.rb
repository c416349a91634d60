# The end-to-end tests' app server: setup.
log "app setup on #{node['opsworks']['instance']['hostname']}"
