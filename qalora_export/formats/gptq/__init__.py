"""formats/gptq"""
