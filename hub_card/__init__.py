"""Hub publishing: the flat trust_remote_code export, the model-card generator and the upload command.

Installed as `modeling_deft_llava.hub_card`. May import the model, configuration and processing.
"""
