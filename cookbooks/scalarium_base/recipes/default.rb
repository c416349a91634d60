#
# Cookbook:: scalarium_base
# Recipe:: default
#
# Run first at setup on every instance. Harmless and portable: it only logs which instance
# this is and writes the facts Scalarium sent to /etc/scalarium/facts.json, so operators and
# other tools on the node can read them without parsing node JSON.

scalarium = node['scalarium'] || {}
instance = scalarium['instance'] || {}
stack = scalarium['stack'] || {}

log 'scalarium_base' do
  message "Scalarium instance #{instance['hostname'] || node.name} " \
          "(#{instance['id'] || 'unknown id'}) of stack #{stack['name'] || 'unknown'}, " \
          "layers: #{Array(instance['layers']).join(', ')}"
  level :info
end

directory '/etc/scalarium' do
  owner 'root'
  group node['root_group'] || 'root'
  mode '0755'
end

facts = {
  'instance' => {
    'id' => instance['id'],
    'hostname' => instance['hostname'],
    'layers' => Array(instance['layers']),
    'private_ip' => instance['private_ip'],
    'public_ip' => instance['public_ip'],
    'availability_zone' => instance['availability_zone'],
    'instance_type' => instance['instance_type'],
  },
  'stack' => {
    'id' => stack['id'],
    'name' => stack['name'],
    'region' => stack['region'],
  },
  'cluster_version' => scalarium['cluster_version'],
}

# No timestamp in the file: the same facts give the same content, so Chef reports no change.
file '/etc/scalarium/facts.json' do
  content Chef::JSONCompat.to_json_pretty(facts) + "\n"
  owner 'root'
  group node['root_group'] || 'root'
  mode '0644'
end
