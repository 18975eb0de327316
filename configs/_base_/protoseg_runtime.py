# What every ProtoSeg config shares: the plugin import and the prototype update hook.
# The ProtoHead's own defaults (K=10, mu=0.999, kappa=0.05, 3 Sinkhorn iterations,
# CE + 0.01 PPC + 0.001 PPD, projection='none') are the paper's; a config states only
# what differs.
custom_imports = dict(imports=['mmseg_proto'], allow_failed_imports=False)
custom_hooks = [dict(type='PrototypeUpdateHook')]
