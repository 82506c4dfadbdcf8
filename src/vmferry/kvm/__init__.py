"""vmferry.kvm"""
