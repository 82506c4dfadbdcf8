"""vmferry.migration"""
