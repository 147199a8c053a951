include $(sort $(wildcard $(BR2_EXTERNAL_BORGIOS_PATH)/package/*/*.mk))
