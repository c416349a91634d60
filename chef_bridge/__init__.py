"""Everything that speaks Chef: signing, cookbooks, bundles, solo.rb, node JSON."""
